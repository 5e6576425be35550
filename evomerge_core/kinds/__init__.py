"""The kinds of run (LLM, VLM, DFS): sources, space, resident model, materialisation."""
