"""A test double of Ascend's ``ais_bench`` package (only ``ais_bench.infer.interface``)."""
