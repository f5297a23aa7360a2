"""Evaluation: zero-shot accuracy, retrieval recall, group and fairness metrics, curation quality."""
