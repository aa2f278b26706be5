"""The files of the directories this toolkit writes: an MLLM output, checkpoint or export directory holds
``mllm_config.yaml`` (its recipe), ``visual.safetensors`` (projector and visual weights), ``llm/`` (a Hugging
Face model directory, or a peft adapter) and, where the tokenizer travels with it, ``viq_tokenizer/``; a
tokenizer stage's output directory holds ``viq_tokenizer/`` too."""

MLLM_CONFIG = "mllm_config.yaml"
VISUAL_WEIGHTS = "visual.safetensors"
LLM_DIR = "llm"
VIQ_DIR = "viq_tokenizer"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
