"""Evaluations of a trained model: held-out loss, memorization, copying, induction heads."""
