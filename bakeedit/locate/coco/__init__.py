"""COCO: contrastive Q/V neurons. ``responses`` records per-neuron responses, ``score`` computes intra-consistency
and inter-contrast, ``select`` picks per category or overall, ``method`` composes them. Importing the package
registers the method."""
