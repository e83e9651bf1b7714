"""Gate a data mixture before training: Gemma 3 270M (offline), real text domains, `legal` protected.

Four candidate training sets (half of each built-in domain; the other half is the target domain, so no
candidate text is scored as a target text): Python code, math, changelogs, and extra legal text. `legal`
is protected. The gate forecasts every candidate over the five target domains (encoded once), rejects the
candidates predicted to move `legal` too much, weights the rest by the paper's STS-proportional rule,
splits a budget of 220 examples, and writes each accepted candidate minus its worst 10% of examples.

Run: python examples/gate_mixture.py   (a few minutes on 2 CPU cores; the demo SAE is trained once if absent)
"""

import time
from pathlib import Path

from sts_callback import STSConfig
from sts_callback.core.corpora import load_domain
from sts_callback.tools.demo import ensure_demo_sae
from sts_callback.pipelines.gate import GateRules, filter_examples, gate_mixture, write_jsonl
from sts_callback.tools.models import load_gemma3_270m

OUTPUT = Path("outputs/gate_mixture")
CANDIDATE_TEXTS = 40  # examples per candidate (all of them are scored one by one)


def halves(name: str) -> tuple[list[str], list[str]]:
    texts = load_domain(name)
    return texts[0::2], texts[1::2]


def main() -> None:
    start = time.perf_counter()
    model, tokenizer = load_gemma3_270m()
    sae = ensure_demo_sae(model, tokenizer)
    split = {name: halves(name) for name in ("python_code", "math", "changelog", "legal")}
    candidates = {
        "code": split["python_code"][0][:CANDIDATE_TEXTS],
        "math": split["math"][0][:CANDIDATE_TEXTS],
        "changelog": split["changelog"][0][:CANDIDATE_TEXTS],
        "legal_extra": split["legal"][0][:CANDIDATE_TEXTS],
    }
    targets = {"legal": split["legal"][1], "code": split["python_code"][1], "math": split["math"][1],
               "changelog": split["changelog"][1], "ml_docs": load_domain("ml_docs")}
    config = STSConfig(n_shifted=100, shift_tokens=1500, domain_tokens=600, max_query_tokens=96,
                       max_demonstration_tokens=128, n_demonstrations=2, n_domain_demonstrations=2,
                       batch_size=8, top_contexts=0)
    rules = GateRules(wanted={"code": "code", "math": "math", "changelog": "changelog", "legal_extra": "legal"})
    decision = gate_mixture(model, tokenizer, sae, candidates, targets, ["legal"], rules, budget=220, config=config)
    print(decision.table())
    print()
    for name in decision.candidates:
        worst = decision.example_scores[name].worst[0]
        print(f"worst example of {name} (score {worst['score']:.3g}): {worst['text'][:90]!r}")
    decision.save(OUTPUT / "gate.json")
    for name in decision.accepted:
        kept = filter_examples(decision, name, keep_fraction=0.9)
        write_jsonl(kept.examples, OUTPUT / "filtered" / f"{name}.jsonl")
    print(f"\nwrote {OUTPUT}/gate.json and {OUTPUT}/filtered/*.jsonl; forwards: "
          f"{decision.forward_calls['domains']} for the domains (once), "
          f"{sum(v for k, v in decision.forward_calls.items() if k != 'domains')} for the candidates; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
