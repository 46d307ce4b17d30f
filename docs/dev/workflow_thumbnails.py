"""Template thumbnails: workflows/<name>.jpg, the image the ComfyUI frontend shows on a custom-node template card.

A title card (the readable title and a one-line description, which the frontend itself cannot show for custom-node
templates: it labels them with the file name) above a drawing of the graph's node layout, coloured by role.
Pure function of the UI workflow and the strings (Pillow's bundled font only), called by docs/dev/gen_workflows.py.
"""

import io

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 384)
HEADER_H = 118
BACKGROUND, HEADER, TEXT, MUTED, LINK = (32, 34, 40), (22, 24, 28), (240, 240, 240), (175, 180, 190), (120, 125, 135)
# Node fill by role; anything else (native helpers) gets the default.
ROLE_COLOURS = {
    "BerniniLoadPlanner": (120, 80, 170), "BerniniPlanSemantics": (120, 80, 170),
    "BerniniLoadRenderer": (50, 100, 170), "BerniniApplyLora": (50, 100, 170), "BerniniMultiGPU": (50, 100, 170),
    "BerniniEncodePrompt": (60, 140, 90), "BerniniEnhancePrompt": (60, 140, 90),
    "BerniniSources": (190, 120, 40), "BerniniSampleVideo": (180, 60, 60), "BerniniDecodeVAE": (90, 95, 105),
    "LoadVideo": (170, 150, 50), "LoadImage": (170, 150, 50), "GetVideoComponents": (140, 125, 60),
    "SaveVideo": (70, 120, 130), "SaveImage": (70, 120, 130), "CreateVideo": (70, 120, 130), "Note": (100, 75, 45),
}
DEFAULT_COLOUR = (90, 95, 105)
TITLE_BAR = 30  # LiteGraph's NODE_TITLE_HEIGHT: the title bar sits above a node's pos


def _font(size):
    return ImageFont.load_default(size=size)


def _wrap(draw, text, font, width):
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def render(workflow: dict, title: str, description: str, quality: int = 80) -> bytes:
    """The JPEG bytes of the thumbnail of a UI workflow."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_lines = _wrap(draw, title, _font(25), SIZE[0] - 32)[:2]
    description_lines = _wrap(draw, description, _font(15), SIZE[0] - 32)[:3]
    header_h = max(HEADER_H, 14 + 31 * len(title_lines) + 19 * len(description_lines) + 12)
    draw.rectangle((0, 0, SIZE[0], header_h), fill=HEADER)
    y = 14
    for line in title_lines:
        draw.text((16, y), line, fill=TEXT, font=_font(25))
        y += 31
    for line in description_lines:
        draw.text((16, y + 2), line, fill=MUTED, font=_font(15))
        y += 19

    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] - TITLE_BAR for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    area = (16, header_h + 14, SIZE[0] - 16, SIZE[1] - 14)
    scale = min((area[2] - area[0]) / (x1 - x0), (area[3] - area[1]) / (y1 - y0))
    left = area[0] + ((area[2] - area[0]) - scale * (x1 - x0)) / 2
    top = area[1] + ((area[3] - area[1]) - scale * (y1 - y0)) / 2

    def box(node):
        x, y = node["pos"]
        return (left + (x - x0) * scale, top + (y - TITLE_BAR - y0) * scale,
                left + (x + node["size"][0] - x0) * scale, top + (y + node["size"][1] - y0) * scale)

    by_id = {n["id"]: n for n in nodes}
    for _, origin, _, target, _, _ in workflow["links"]:
        a, b = box(by_id[origin]), box(by_id[target])
        draw.line(((a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)), fill=LINK, width=2)
    for node in nodes:
        rect = box(node)
        colour = ROLE_COLOURS.get(node["type"], DEFAULT_COLOUR)
        draw.rounded_rectangle(rect, radius=3, fill=colour, outline=(15, 15, 18))
        bar = (rect[0], rect[1], rect[2], min(rect[3], rect[1] + TITLE_BAR * scale))
        draw.rectangle(bar, fill=tuple(max(0, c - 35) for c in colour))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
