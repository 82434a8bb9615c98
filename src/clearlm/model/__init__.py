"""The decoder and its conversion to and from Hugging Face transformers' layout."""
