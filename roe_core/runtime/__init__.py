"""What every routing system shares: conversations and batches (conversation.py), images
(images.py), loading Hugging Face LLaVA models (loading.py), decoder plumbing (decoder.py), greedy
decoding (generation.py) and the tiny random model for tests (tiny.py)."""
