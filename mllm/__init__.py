"""LLaVA-style multimodal LLM on any Hugging Face causal LM, fed by ViQ codes or a continuous tower."""
