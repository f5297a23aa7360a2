"""Input data: the fashion-captions benchmark builder, its sources, and WebDataset I/O."""
