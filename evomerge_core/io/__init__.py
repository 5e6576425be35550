"""Model files: lazy safetensors reading, sharded writing, model directories, dtypes."""
