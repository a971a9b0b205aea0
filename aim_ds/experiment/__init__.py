"""The continual-learning experiment around the plugin: what the driver (and examples, benchmarks) build and score.

modeling     model and tokenizer construction, the cache folder, the one tiny-Llama shape
evaluation   scores of a model on a task (exact match, ROUGE-L) and OP / BWT / FWT
report       a run's result files (atomic writers) and plots
"""
