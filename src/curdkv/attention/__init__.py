"""Attending over a compressed cache: the attention function curdkv registers with transformers.

``function`` (the registered function and its dispatch to the ragged kernel
or the reference), ``reference`` (the obvious versions the fast paths are
tested against), ``recording`` (the prefill queries presses read).
"""
