"""Readers (one module per input format) and writers. All readers return lists of :class:`Slide`."""
