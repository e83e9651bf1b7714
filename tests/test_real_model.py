"""The few tests on the real offline model (Gemma 3 270M). Marked slow."""

import pytest
import torch

from sts_callback import STSConfig, forecast
from sts_callback.core.capture import ResidualCapture
from sts_callback.core.corpora import load_domain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from sts_callback.tools.models import load_gemma3_270m

    return load_gemma3_270m()


def test_gemma_capture_matches_hidden_states_and_truncation(gemma):
    model, tokenizer = gemma
    batch = tokenizer(["def add(a, b):\n    return a + b", "The licensee shall not"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    truncated = ResidualCapture(model, 12)(batch["input_ids"], batch["attention_mask"])
    full = ResidualCapture(model, 12, truncate=False)(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(truncated, hidden[13])
    torch.testing.assert_close(full, truncated)
    last = ResidualCapture(model, 17)(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last), hidden[18], rtol=1e-4, atol=1e-4)


def test_gemma_forecast_on_builtin_domains(gemma):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model, tokenizer = gemma
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=640, d_sae=512, k=16,
                                metadata=SAEMetadata(hook_name="blocks.12.hook_resid_post")))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.05)
    config = STSConfig(n_shifted=20, shift_tokens=300, domain_tokens=150, n_domain_demonstrations=2,
                       max_query_tokens=64, max_demonstration_tokens=64)
    result = forecast(model, tokenizer, sae, load_domain("python_code")[:40],
                      ["legal", "math", "python_code"], config)
    assert result.settings["layer"] == 12 and result.settings["truncated_forward"]
    assert set(result.domains) == {"legal", "math", "python_code"}
    assert 300 <= result.shift_tokens < 400
    assert all(d.scores["sts_icl"] > 0 and d.tokens >= 150 for d in result.domains.values())
