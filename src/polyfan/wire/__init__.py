"""The ZeroMQ wire between the roles: the message codec, the agg's decoding of received frames
(topics, sequences and gaps), compiled per-message socket I/O, and what one peer may hold."""
