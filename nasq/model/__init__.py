"""The model: frozen facts (``spec``), Cadene's NASNet-A loaded from a checkpoint
(``checkpoint``), and BatchNorm folding for the fast path (``fold``)."""
