"""The report: the benchmark's four metrics per policy, comparison tables and figures (HTML + Markdown)."""
