"""The debugger: training-health and profiler rules that watch every rank of a run and act.

``settings``: the spec's ``train.debug`` section; ``capture``: what is measured, with PyTorch's
hooks, on the steps captured; ``rules``: pure functions judging it; ``debugger``: the loop monitor
that captures, judges and acts; ``report``: the findings and plots a finished run keeps."""
