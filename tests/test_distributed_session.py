"""The session's own bookkeeping across two real processes (torchrun, gloo, CPU): a hand-written DDP loop
writes from rank 0 only without being told which rank it is and records a one-rank failure on both, and a resume
into a new folder gives every rank the state rank 0 read."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).parent / "distributed_session_worker.py"


def run(mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), mode, str(out)], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_session_in_a_hand_written_ddp_loop_writes_from_rank_0_only(tmp_path):
    rank0, rank1 = run("session", tmp_path / "out")
    assert (rank0["is_main"], rank1["is_main"]) == (True, False)
    assert rank0["file"] == [2, 4]  # one line per re-check, not one per rank
    assert rank0["history"] == rank1["history"] == [2, 4]
    assert rank1["written"] == [] and "forecast.json" in rank0["written"]
    # a failure on one rank inside a re-check given the DDP-wrapped model: recorded alike on both, no hang
    assert rank0["errors"] == rank1["errors"] and "[rank 1] CUDA out of memory" in rank0["errors"][0]
    assert rank0["errors"][1] is None


def test_resuming_into_a_new_folder_gives_every_rank_what_rank_0_adopted(tmp_path):
    rank0, rank1 = run("resume_elsewhere", tmp_path / "out")
    assert rank0["origin"] == [2, 4]
    for rank in (rank0, rank1):  # the origin's re-check at step 2, then the resumed run's at 4
        assert rank["forecast"] and rank["history"] == [2, 4] and rank["errors"] == [None, None]
    assert rank1["written"] == []
