"""Bars: trade conditions, the numba kernels, open-bar state, history, outages, and the agg's
core that joins them (received frames in, messages to publish out)."""
