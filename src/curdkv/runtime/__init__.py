"""When compression happens, and the only code that runs the model to make it happen.

``model`` (which models are supported), ``layer`` (scores -> choice -> cache
layer), ``hooks`` (:func:`compress`, during prefill), ``capture`` (one prefill
kept for sweeps), ``nll`` (likelihoods for calibrated ratios), ``overlap``
(compression on a second CUDA stream), ``decoding`` (a budget held while
generating), ``lookahead`` (pseudo queries decoded ahead).
"""
