"""Decode Bernini VAE: declarative inputs over bernini_core.node_api.decode."""

from bernini_core import node_api


class BerniniDecodeVAE:
    DESCRIPTION = ("Decodes raw Wan 2.1 latents (from Sample Bernini Video or a native Wan node) with the Wan 2.1 VAE "
                   "into frames for CreateVideo / SaveVideo or image nodes.")
    CATEGORY = "Bernini/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The frames [frames, height, width, 3], 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("BERNINI_VAE", {"tooltip": "The vae output of Load Bernini Renderer."}),
            "samples": ("LATENT", {"tooltip": "Raw Wan 2.1 latents [batch, 16, T, H/8, W/8]."}),
            "tiled": ("BOOLEAN", {"default": False,
                                  "tooltip": "Decode in overlapping spatial tiles to bound memory at 720p and above."}),
            "tile_size": ("INT", {"default": 256, "min": 64, "max": 2048, "step": 16,
                                  "tooltip": "Tile edge in pixels (tiled only)."}),
            "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 16,
                                     "tooltip": "Overlap between tiles in pixels, blended linearly (tiled only)."}),
        }}

    def decode(self, vae, samples, tiled, tile_size, tile_overlap):
        return (node_api.decode(vae, samples, tiled, tile_size, tile_overlap),)


NODE_CLASS_MAPPINGS = {"BerniniDecodeVAE": BerniniDecodeVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"BerniniDecodeVAE": "Decode Bernini VAE"}
