"""canvaslm: run, serve and fine-tune block-diffusion language models."""
