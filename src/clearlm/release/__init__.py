"""Release: a Hugging Face-loadable folder with cards, logs, results and the lineage of every artifact."""
