"""The upstream feed: the Polygon session as a state machine, and the scanner that turns its
trade frames into columns."""
