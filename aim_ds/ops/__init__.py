"""Tensor math on flat shards, the plugin's small collectives and the shifted losses of mixed batches.

fusion       chunked fusion and learning-signal sums on flat shards (no collectives, no DeepSpeed)
collectives  every collective the plugin issues (16-byte sums, the quantile histogram, `agree`) and
             `fatal_error`
losses       the shifted token losses of a batch's new and memory rows (`rows_loss`, `mixed_loss`)
"""
