"""Data for the MLLM: readers, chat rendering with assistant-only labels, the supervised data set,
padding-free packing and the demo data generator. Import the submodules directly; this package
imports nothing so that, e.g., the demo generator stays light."""
