"""How faceclr measures itself: the machine a figure came from, peak memory, and benchmark records that
say which commit and command produced them. Every benchmark (pack, kernels, engine) and the trainer use it."""
