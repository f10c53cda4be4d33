"""Small helpers shared by the library and the command lines: atomic writes, images, progress bars,
downloads, metric logging and the CPU allocator settings. Nothing here imports the model or the data."""
