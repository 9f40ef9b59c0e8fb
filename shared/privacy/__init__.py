"""Privacy: the noise families, the CSPRNG that samples them, the accountant over typed step runs, noise search."""
