"""dpmsolver: fast diffusion sampling."""
