"""What the prompt enhancer asks a vision-language model, per task, and how its answer is read
(docs/prompt_enhancer.md §2–§3).

The instructions are written for this project; they ask for what the official enhancer's templates ask for (official
``bernini/prompt_enhancer.py``: ``T2V_A14B_EN_SYS_PROMPT``, ``T2I_A14B_EN_SYS_PROMPT``, ``V2V_TEMPLATE``,
``I2I_TEMPLATE``, ``R2V_TEMPLATE``, ``VR2V_TEMPLATE``, ``ADS2V_TEMPLATE``, chosen in ``PromptEnhancer.__call__``).
Kept word for word are only the instruction openings the renderer was trained to read ("Replace … with …",
"Apply camera motion: …", "Generate a video where …"): they are part of the model's input format.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import BerniniError
from ..tasks import TASK_NAMES

log = logging.getLogger("bernini.prompt_enhancer")

# The one key of the JSON answer the subject-reference templates ask for (official json_mode tasks).
ANSWER_KEY = "rewritten_text"
JSON_TASKS = ("r2v", "rv2v")

_DIRECTOR_RULES = """\
Rewrite the idea so that it is complete and visually expressive, without changing what it is about (its subjects and \
what they do):
1. Add at most four cinematic details that suit the scene, chosen from these kinds (you need not use every kind):
   - time of day: daytime, night, dawn or sunrise; when the idea does not say, use daytime;
   - light source: daylight, artificial light, moonlight, practical lamps, firelight, fluorescent light, overcast or \
sunny light, chosen for an indoor or outdoor scene, saying where the light comes from (a window, a lamp);
   - light quality: soft or hard;
   - colour tone: warm, cool or mixed;
   - light direction: from above, from the side, from below, or rim light;
   - shot size: extreme wide, wide, medium wide, medium, medium close-up, close-up or extreme close-up; when \
nothing calls for another, use a medium or a wide shot;
   - camera angle: over the shoulder, low, high, Dutch, aerial or overhead; leave this out when the idea already \
describes how the camera moves;
   - composition: centred, balanced, weighted to the left or right, symmetrical or short-side; when nothing calls \
for another, use a centred composition.
2. Flesh out the subjects the idea names (appearance, expression, number, ethnicity, pose) and add detail to the \
background, but never add a subject the idea does not have (no people in a landscape without people).
3. Describe what can be seen; write no literary lines about mood or feelings.
{motion_rule}
5. Add no style when the idea names none. When it names one, put the style first; for styles far from live-action \
film (2D illustration, anime, cartoons) leave out the cinematic light and camera terms.
6. Make any sky a clear deep-blue sky, never blown out.
7. Write in English only, about 60 to 200 words, and begin with the prompt itself, with no heading such as \
"Rewritten prompt:".
8. Never write sexual or suggestive content: when the idea asks for it, silently write a tasteful, clearly different \
scene instead, without refusing or commenting.
"""

_VIDEO_MOTION_RULE = ("4. Describe every action as it happens, step by step. When nothing moves, give the subject a "
                      "fitting motion, and let the background move naturally too (drifting clouds, leaves in the "
                      "wind).")
_STILL_MOTION_RULE = ("4. The result is one still image: describe no motion, no camera movement and no action in "
                      "progress; describe the subjects' and the background's state: pose, expression, placement, "
                      "framing.")

T2V_SYSTEM = ("You are a film director. You turn a user's short idea for a video into one polished English prompt "
              "for a text-to-video model.\n\n" + _DIRECTOR_RULES.format(motion_rule=_VIDEO_MOTION_RULE) + """
An example of the wanted result: "Side lighting, medium shot, warm colours, centred composition. An elderly \
fisherman with a grey beard and a faded yellow raincoat sits on an overturned wooden crate at the end of a pier, \
mending a green net across his knees. His weathered hands pull the twine tight, pause, then loop it through the next \
knot. Gulls circle above the calm harbour behind him, small boats rock gently at their moorings, and late afternoon \
sunlight from the left catches the wet planks of the pier."
""")

T2I_SYSTEM = ("You are a film director and photographer. You turn a user's short idea for a picture into one "
              "polished English prompt for a text-to-image model.\n\n"
              + _DIRECTOR_RULES.format(motion_rule=_STILL_MOTION_RULE) + """
An example of the wanted result: "Soft lighting, close-up shot, cool colours, centred composition. A young woman \
with short black hair and round silver glasses leans against a rain-streaked café window at night, her chin resting \
on one hand, a steaming white cup in front of her on a marble table. Blue neon from the street outside falls across \
her face, and blurred headlights glow in the wet glass behind her."
""")

_EDIT_RULES = """\
Write one editing prompt that:
1. states the change precisely: what changes, how it looks, where it is, {change_details};
2. states what must stay as it is: the subjects, background and elements the edit does not touch;
3. makes vague wishes concrete: replace generic requests ("more cartoon characters", "cute toy figures", "different \
clothes", "some animals") with specific, well-known, named instances that fit the look of the {medium} (named \
characters, exact outfits), and leave no placeholder.
Write natural prose, e.g. "Add a red apple on the table. The table and the curtains stay unchanged.", without \
labels such as "Modifications:" or "Preservations:".

First decide which kind of edit the instruction asks for, then phrase the prompt for that kind:
{kinds}
Answer with the final English prompt only: no explanation, greeting or kind name. Describe nothing that is not in \
the {medium}. {one_sentence_rule}
"""

_VIDEO_EDIT_KINDS = """\
- replacement: "Replace <original element> with <new element>."
- addition: "Add <element> <where, doing what>."
- removing an object or the background: "Delete <object> <where>."
- removing subtitles: "Remove subtitles from the video."
- generation from a depth map: "Generate video with depth map." followed by a full description of the target video
- generation from a sketch: a full text-to-video description of the wanted result
- colourisation: "Colorize the video." followed by the scene and the colours it should have
- inpainting: "Inpaint this video." followed by what fills the region
- detection: "Detect the mask region of <the object>."
- stylisation, kept short: "Convert the video to <style>: <a few style details>."
- several edits at once: one combined instruction, not a list of sub-edits
- camera movement: "Apply camera motion: <the movement>", e.g. "Apply camera motion: orbit down"
- another viewpoint: "Switch the camera to a <first/third>-person perspective", or "Move the camera <how it goes \
from the current view to the wanted one>"
- another focus: "Shift the focus to <subject>, making her/him/it sharp. Blur <what should blur>."
- anything else: follow the three rules above."""

_IMAGE_EDIT_KINDS = """\
- replacement: "Replace <original element> with <new element>."
- addition: "Add <element> <where>."
- removing an object or the background: "Delete <object> <where>."
- removing text, a watermark or a logo: "Remove <the text / watermark / logo> from the image."
- generation from a depth map: "Generate image with depth map." followed by a full description of the target image
- generation from a sketch: a full text-to-image description of the wanted result
- colourisation: "Colorize the image." followed by the scene and the colours it should have
- inpainting: "Inpaint this image." followed by what fills the region
- extending the picture: "Extend the image <direction>." followed by what the new area shows
- detection: "Detect the mask region of <the object>."
- stylisation, kept short: "Convert the image to <style>: <a few style details>."
- relighting: "Relight the image: <light direction, colour temperature, strength and the shadows that result>."
- pose or expression: "Change the <subject>'s <pose/expression> to <the new one>.", keeping identity, clothing and \
background unless asked otherwise
- another viewpoint of the same scene: "View the scene from <the viewpoint>", e.g. "View the scene from a low angle, \
turned about 30 degrees to the right."
- another focus: "Shift the focus to <subject>, making her/him/it sharp. Blur <what should blur> with a shallow \
depth of field."
- several edits at once: one combined instruction, not a list of sub-edits
- anything else: follow the three rules above."""

V2V_USER = ("Task: video editing.\nYou write English editing prompts for a video-to-video editing model. The images "
            "after this text are frames sampled evenly from the source video, in time order.\n\n"
            "The user's raw instruction: \"{prompt}\"\n\n"
            + _EDIT_RULES.format(change_details="its lighting and how it follows the motion of the scene",
                                 medium="video", kinds=_VIDEO_EDIT_KINDS,
                                 one_sentence_rule="For camera movements and viewpoint changes write one sentence "
                                                   "about the camera and nothing else."))

I2I_USER = ("Task: image editing.\nYou write English editing prompts for an image editing model. The image after this "
            "text is the source image.\n\n"
            "The user's raw instruction: \"{prompt}\"\n\n"
            + _EDIT_RULES.format(change_details="its lighting and shadows, and that its perspective fits the scene",
                                 medium="image", kinds=_IMAGE_EDIT_KINDS,
                                 one_sentence_rule="For viewpoint changes write one sentence about the viewpoint and "
                                                   "nothing else."))

R2V_USER = """\
You write prompts for a subject-driven video model. The {count} image(s) after this text show the subject(s) that \
must appear in the video, called image0, image1, image2, ... in the order given. The user's description of the video \
is at the end.

Rewrite the description as two parts joined into one text:
1. A short instruction: one sentence saying who the subject(s) from the reference image(s) are, what they briefly \
look like, where they are and their main action, naming each subject by its image ("image0", "image1", ...).
2. A long instruction beginning "Generate a video where": each subject in detail (hair, clothing, accessories, \
expression), referred to as "the man from image0", "the dog from image1" and so on; the setting in detail \
(background, light, objects, atmosphere); and the motion as a sequence in time (at first …, then …, after that …), \
natural and realistic.

Rules: name every subject by its image number, in the order of the images; describe only what the reference images \
really show and invent no detail of the subjects; take the scene, actions and motion from the description and make \
them richer and more vivid; write in English only.
Answer with a JSON object with one key, "rewritten_text", whose value is the short and the long instruction as one \
string, and nothing else.

The user's description:
{prompt}
"""

RV2V_USER = """\
You write prompts for a video editing model guided by reference images. The first three images after this text are \
frames sampled evenly from the source video to edit (frame0, frame1, frame2, in time order); the next {count} \
image(s) are the reference image(s), called image0, image1, ... in order. The user's editing instruction, which may \
be in Chinese, is at the end.

A reference image can play different roles: the person or object to put into the video (replacing something, or \
added), a visual style to adopt, a motion or pose to copy, or an attribute to change. Work out its role from the \
instruction.

Write one English paragraph: the editing instruction, followed by a detailed description of the video it produces. \
Rules:
1. Use the verb that fits the edit: "Replace …", "Remove …", "Add …", "Restyle … in the style of …", "Transfer the \
motion of … to …", "Change the … of …". Do not make every edit a replacement.
2. An addition is not a replacement: when adding something, keep the number and the positions of the people and \
objects already in the video.
3. When a new object's shape or size differs from the one it replaces, let it differ; do not ask for the same shape \
or size.
4. Describe the result directly, as the finished video, without phrases such as "after editing" or "in the edited \
video".
5. Whatever comes from a reference image (a person, an object, clothing, colours, materials, markings) must match \
what that image shows; add nothing it does not show.
6. Left and right are as seen on the screen, never from the subject's point of view (a person facing the camera has \
their right hand on the left of the screen): convert the instruction's directions.
7. For a local edit, say explicitly what stays unchanged: the framing and camera motion, the lighting, the \
background, the other objects, shadows and reflections, the motion in the scene.
8. For a style or motion reference, describe the resulting style or movement concretely (palette, brushwork, the \
body's positions over time) so the model can reproduce it.
9. Use no parentheses; work every clarification into the sentences.
10. Write English only; for a Chinese instruction, carry its intent over into natural English.
11. Give about 120 to 200 words of detail.
Answer with a JSON object with one key, "rewritten_text", whose value is the whole editing prompt as one string, and \
nothing else.

The user's instruction:
{prompt}
"""

ADS2V_USER = """\
Task: inserting an advertisement into a video.
The images after this text are frames sampled evenly from the source video, three per clip in time order; when there \
are six, the last three come from the reference clip to insert.

The user's instruction: "{prompt}"

Write one short English instruction, a single sentence of the form "Add <brand and product> <kind of ad: a poster, \
a billboard, a wall screen playing a clip> <where in the scene>", for example "Add a Nike running shoe poster on the \
bus shelter at the right of the street". Answer with that sentence only.
"""


@dataclass(frozen=True)
class EnhanceRequest:
    """One conversation for the enhancing model: the system message, the user's text, the images shown after it
    (uint8 [H, W, 3], video frames first, then reference images), and whether the answer is the JSON object."""

    task: str
    system: str
    user_text: str
    images: tuple = ()
    json_answer: bool = False


def default_system_message() -> str:
    """The system message of every template task (the official ``SYSTEM_PROMPTS["default"]``, the renderer table's
    'default' entry in data/bernini_prompts.json)."""
    from ..text_encoder import renderer_system_prompt

    return renderer_system_prompt("default")


def build_request(task: str, prompt: str, *, frames: list, references: list) -> EnhanceRequest:
    """The conversation the enhancer sends for ``task`` (official ``PromptEnhancer.__call__``): t2v / t2i put the
    director instructions in the system message and the prompt as the user's text; the other tasks use the default
    system message and put the prompt inside their template. ``frames``: the sampled source-video frames;
    ``references``: the reference (or, for i2i, source) images."""
    if task not in TASK_NAMES:
        raise BerniniError(f"prompt enhancer: task {task!r} is not a Bernini task; choose one of "
                           f"{', '.join(TASK_NAMES)}.")
    count = max(len(references), 1)  # the official fills {image_num} with at least 1
    if task == "t2v":
        return EnhanceRequest(task, T2V_SYSTEM, prompt)
    if task == "t2i":
        return EnhanceRequest(task, T2I_SYSTEM, prompt)
    system = default_system_message()
    if task in ("v2v", "mv2v"):
        return EnhanceRequest(task, system, V2V_USER.format(prompt=prompt), tuple(frames))
    if task == "i2i":
        return EnhanceRequest(task, system, I2I_USER.format(prompt=prompt), tuple(references))
    if task == "ads2v":
        return EnhanceRequest(task, system, ADS2V_USER.format(prompt=prompt), tuple(frames))
    if task == "r2v":
        return EnhanceRequest(task, system, R2V_USER.format(count=count, prompt=prompt), tuple(references),
                              json_answer=True)
    # rv2v
    return EnhanceRequest(task, system, RV2V_USER.format(count=count, prompt=prompt),
                          tuple(frames) + tuple(references), json_answer=True)


# ---------------------------------------------------------------------------- answers
_THINK_END = "</think>"
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)\s*```", re.DOTALL)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:final |enhanced |rewritten |improved )?(?:english )?prompt(?:\*\*)?\s*[:：]\s*",
                    re.IGNORECASE)


_QUOTE_PAIRS = {('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("「", "」")}


def _json_text(candidate: str) -> Optional[str]:
    """The rewritten text of one JSON candidate: its "rewritten_text", or the only string of a one-key object."""
    try:
        value = json.loads(candidate)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    text = value.get(ANSWER_KEY)
    if text is None and len(value) == 1:
        text = next(iter(value.values()))
    return text.strip() if isinstance(text, str) and text.strip() else None


def _from_json(text: str) -> Optional[str]:
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        found = _json_text(candidate.strip())
        if found:
            return found
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False
    return True


def _plain(text: str) -> str:
    fenced = _FENCE.fullmatch(text.strip())
    if fenced:
        text = fenced.group(1)
    text = _LABEL.sub("", text.strip()).strip()
    if len(text) >= 2 and (text[0], text[-1]) in _QUOTE_PAIRS:
        text = text[1:-1].strip()
    return text


def parse_answer(answer: Optional[str], json_answer: bool, task: str = "") -> Optional[str]:
    """The rewritten prompt in a model's answer, or None when the answer holds none (the caller then keeps the
    user's prompt). A reasoning block (``<think>…</think>``) is dropped. Where the template asks for the JSON object
    (``json_answer``), its "rewritten_text" is taken, also from a fenced block or from an object inside prose; an
    answer in another shape is used as plain text (the official would fail on it and retry), with one info line.
    Plain answers lose a fence, a leading "Prompt:" label and enclosing quotes."""
    if not isinstance(answer, str):
        return None
    text = answer.split(_THINK_END)[-1].strip()
    if not text:
        return None
    if json_answer or text.startswith(("{", "```")):
        found = _from_json(text)
        if found:
            return found
        if _is_json(text):  # valid JSON without a usable text: nothing to use
            return None
        if json_answer:
            log.info("prompt enhancer: the %s answer is not the JSON object its template asks for; using it as "
                     "plain text.", task or "model's")
    return _plain(text) or None
