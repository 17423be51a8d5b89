"""EM-DPO (Chidambaram et al., arXiv 2405.15065): latent annotator types by EM over rankings, a mixture of
type policies (`em.py`, starts in `init.py`, policies in `types.py`) and min-max-regret aggregation of the
mixture into one fair policy (`aggregate.py`)."""
