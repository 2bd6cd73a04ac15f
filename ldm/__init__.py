"""ldm: Latent Diffusion Models training framework."""
