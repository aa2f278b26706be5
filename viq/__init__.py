"""ViQ: text-aligned visual quantized representations at any resolution."""
