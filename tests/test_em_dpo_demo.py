"""`prefalign demo em-dpo` end to end in miniature: every part runs (the bandit in its second process), and
summary.json and report.md carry every claim with its numbers under the documented keys. The claims
themselves are checked at real sizes in tests/test_bandit_em.py and measured by the quick demo."""

import json
import re

import pytest

from prefalign.demos import em_dpo

SIZES = {
    "bandit": {"annotators": [200, 400], "restarts": 1, "max_iterations": 30, "fair_annotators": 60,
               "fair_restarts": 1},
    "reviews": {"annotators": 24, "iterations": 2, "fair_annotators": 12, "per_annotator": 2,
                "fair_iterations": 1, "samples": 2},
}  # fmt: skip


@pytest.mark.slow
def test_em_dpo_demo_in_miniature_writes_every_claim(tmp_path):
    summary = em_dpo.run(tmp_path, quick=True, seeds=[0], sizes=SIZES)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["bandit"]["seeds"] == [0, 1, 2]  # the bandit always runs at least 3 seeds
    for design in ("binary", "ternary", "top1_of_3", "binary_8_per_annotator"):
        for count in ("200", "400"):
            row = saved["bandit"]["identifiability"][design][count]
            assert {"mixture_error", "mixture_error_std", "weight_error", "norm_ratio", "ari", "oracle_ari",
                    "loglik_truth_minus_indifferent", "per_seed"} <= row.keys()  # fmt: skip
            assert len(row["per_seed"]) == 3
    for method in ("pooled_dpo", "mmra"):
        assert len(saved["bandit"]["fairness"][method]["max_regret_per_seed"]) == 3
    for method in ("pooled_dpo", "mmra", "mmra_implicit"):
        assert saved["reviews"]["fairness"][method]["max_regret"] >= 0
    assert {"mixture_error", "ari", "oracle_ari", "loglik_truth", "loglik_indifferent"} <= saved["reviews"][
        "memorisation"
    ].keys()
    claims = {c["claim"]: c for c in summary["claims"]}
    assert len(claims) == 9 and all(isinstance(c["holds"], bool) for c in claims.values())
    # binary pairs from +w / -w at 50/50: the likelihood gap to an indifferent population is 0 at any size
    assert "largest gap" in claims["bandit_binary_not_identified"]["sentence"]
    report = (tmp_path / "report.md").read_text()
    assert report.count("- **holds**") + report.count("- **does not hold here**") == 9
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (tmp_path / png).stat().st_size > 1000
