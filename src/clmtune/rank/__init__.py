"""Rank kernels (a foundation): the log-likelihood of each label after a prompt, shared by the evaluate stage, the
evaluation during training and the server's ``/v1/classify``.

- ``labeltree``: the one label prefix tree (rank's scoring and search, constrained decoding);
- ``headscore``: label log-probabilities from the final hidden states, block by block over the LM head;
- ``scoring``: every label scored (packed tree, shared KV cache, pairs);
- ``search``: the exact best-first search over the label tree (a trained model's answer in a few steps);
- ``predict``: ``predict_rank``, a label per example by the two.
"""
