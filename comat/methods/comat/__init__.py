"""CoMat (arXiv 2404.03653): concept activation, fidelity preservation (discriminator, mixed latent) and attribute
concentration, with its configuration, losses and presets."""
