"""Small helpers shared by the library and the command lines: the one path type (local or gs://), atomic
writes, images, progress bars, downloads, metric logging and the CPU allocator settings. Nothing here imports
the model or the data."""
