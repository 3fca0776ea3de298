"""The input oracle: the rule-based policy, answering from what a featurized batch row shows.

It checks the claim of the batch contract that the inputs decide the answer: given only the model
inputs of one row of `spec.batch_spec` (`INPUT_FIELDS`: text, mel, frames, state features,
constraint tags, the earlier turn's action log, the modality mask) and the perceptual facts the
world drew into the frames and the mel (who sits where, who is asleep, whether the cabin is dark,
the voice; `perceptual_facts`), it rebuilds the policy's context and runs `policy.policy` on it.
Where its answer differs from the target, the row did not carry what the answer depends on.

How each part of the context is read back:

- the request: the text after the last `<sep>` of `text_tokens`, decoded and looked up in every
  paraphrase the world can say (`request_lexicon`); a spoken-only turn has no current text, so
  its request is read from the mel: `render.render_mel` gives every syllable two formant bins
  fixed by its crc32, and the mel is matched against the formant pattern of every paraphrase
  (`MelReader`).
- the earlier turn: its request from the text before the last `<sep>`, what it did and the values
  it replaced from `history_actions` / `history_before` (`policy.Turn.from_log`).
- the cabin: `cabin.state_from_features` of `state_numeric`, `state_categorical` and
  `constraint_tags`, with children, sleepers and darkness from the perceptual facts (the seat
  sensors only say whether a seat is taken).

Nothing here reads a target (`action_tokens`, `explanation_tokens`, ...) or the sample dict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vlacabin_jax.data import cabin, features, phrases, policy, render, world
from vlacabin_jax.data.actions import NOOP, PAD_ID, SEATS, ActionVocabulary
from vlacabin_jax.data.cabin import CONSTRAINT_TAGS, CabinState
from vlacabin_jax.data.policy import Context, Request, Turn

# The batch fields the oracle may read: the model's inputs, no target.
INPUT_FIELDS = ("text_tokens", "text_mask", "mel", "mel_mask", "frames", "frame_mask", "state_numeric",
                "state_categorical", "constraint_tags", "history_actions", "history_before", "modality_mask")
_SPEECH, _TEXT = 0, 1  # positions in `modality_mask` (spec.MODALITIES)


class Undecidable(ValueError):
    """The row's inputs do not name a request (a text no paraphrase says, no text and no mel, an
    action log without the earlier turn's text)."""


def perceptual_facts(state_json: Mapping, voice: str | None) -> dict:
    """The facts the world rendered into frames and mel, from a sample's `state` JSON.

    Args:
      state_json: `CabinState.to_json()` (a sample's `state`).
      voice: "calm" / "stressed" (None for a typed request), e.g. `world.vla_context(...).voice`.
    Returns:
      {"occupants": [per SEATS "empty" | "adult" | "child"], "asleep": [per SEATS bool],
       "dark": bool, "voice": voice}.
    """
    return {"occupants": list(state_json["occupants"]), "asleep": [bool(a) for a in state_json["asleep"]],
            "dark": float(state_json["light"]) < cabin.DARK, "voice": voice}


def request_lexicon() -> dict[str, Request]:
    """Every paraphrase the world can say, in both languages → the request it says.

    Built from `world.request_slot_options` (every slot assignment the world draws) and
    `phrases.utterance_options` (every template of that request), so it is exactly the text the
    generator can produce.
    Raises:
      ValueError: one text says two different requests (the text could not decide them).
    """
    out: dict[str, Request] = {}
    for typ in policy.REQUEST_TYPES:
        for slots in world.request_slot_options(typ):
            req = Request.make(typ, **slots)
            for lang in phrases.LANGUAGES:
                for text in phrases.utterance_options(typ, slots, lang):
                    if out.setdefault(text, req) != req:
                        raise ValueError(f"{text!r} says both {out[text]} and {req}")
    return out


class MelReader:
    """Reads which paraphrase a rendered mel speaks by its formant pattern.

    Every syllable has two formant bumps at bins fixed by its crc32 (`render.formant_template`);
    the reader projects each speech frame on each candidate's template for that frame, so the
    voice's energy, pitch and noise (the same for every candidate) do not pick the answer.

    Args:
      texts: the candidate utterances (e.g. the keys of `request_lexicon`).
      n_mels, mel_frames: the render sizes (the config's `model.speech.n_mels`, `data.mel_frames`).
    """

    def __init__(self, texts: Sequence[str], n_mels: int, mel_frames: int):
        by_length: dict[int, list[tuple[np.ndarray, str]]] = {}
        for text in texts:
            units, per = render.spoken_units(text, mel_frames)
            tmpl = render.formant_template(units, per, n_mels)
            tmpl = tmpl - tmpl.mean(axis=1, keepdims=True)  # centred, unit norm per frame
            tmpl /= np.linalg.norm(tmpl, axis=1, keepdims=True)
            by_length.setdefault(2 + len(tmpl), []).append((tmpl, text))
        # {mel length T (silence, speech, silence): (templates float32[C, T - 2, n_mels], the C texts)}.
        self.candidates = {t: (np.stack([c[0] for c in cs]), [c[1] for c in cs]) for t, cs in by_length.items()}

    def scores(self, mel: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(candidate texts of this mel's length, their scores float[C]): the mean over speech frames
        (the silent first and last left out) of the centred frame's projection on the candidate's
        template; the spoken text scores highest.

        Args:
          mel: float32[T, n_mels], the frames the mel mask marks present.
        """
        cands = self.candidates.get(len(mel))
        if cands is None:
            raise Undecidable(f"no paraphrase is spoken in {len(mel)} mel frames")
        tmpl, texts = cands
        speech = np.asarray(mel[1:-1], np.float32)
        speech = speech - speech.mean(axis=1, keepdims=True)
        return texts, np.einsum("ctm,tm->c", tmpl, speech) / len(speech)

    def read(self, mel: np.ndarray) -> str:
        """The best-matching candidate text of `mel` (float32[T, n_mels])."""
        texts, scores = self.scores(mel)
        return texts[int(np.argmax(scores))]


class InputOracle:
    """The policy's answer from a batch row's inputs and the perceptual facts.

    Args:
      cfg: the config the rows were featurized with (`model.action_len`, `model.speech.n_mels`,
        `data.mel_frames`, text ids).
      tokenizer: the text tokenizer (default: the packaged one, `features.load_tokenizer()`).
      vocab: the action vocabulary (default: the current schema's).
    """

    def __init__(self, cfg, tokenizer=None, vocab: ActionVocabulary | None = None):
        self._tok = tokenizer or features.load_tokenizer()
        self._vocab = vocab or ActionVocabulary()
        self._sep = features.sep_id(self._tok, cfg)
        self.lexicon = request_lexicon()
        self.mel_reader = MelReader(list(self.lexicon), int(cfg.model.speech.n_mels), int(cfg.data.mel_frames))

    # ------------------------------------------------------------ text and speech
    def texts(self, row: Mapping[str, np.ndarray]) -> tuple[list[str], str]:
        """(earlier turns' texts, oldest first; the current text, "" for a spoken-only turn).

        Args:
          row: text_tokens int32[text_len], text_mask bool[text_len].
        """
        ids = [int(i) for i in np.asarray(row["text_tokens"])[np.asarray(row["text_mask"], bool)]]
        parts, cur = [], []
        for i in ids:  # every earlier turn ends in <sep>; the current text follows the last one
            if i == self._sep:
                parts.append(cur)
                cur = []
            else:
                cur.append(i)
        return [self._tok.decode(p) for p in parts], self._tok.decode(cur) if cur else ""

    def _lookup(self, text: str, what: str) -> Request:
        req = self.lexicon.get(text)
        if req is None:
            raise Undecidable(f"{what} {text!r} is no paraphrase of any request")
        return req

    def request(self, row: Mapping[str, np.ndarray]) -> Request:
        """The current request: from its text, else (spoken only) from the mel.

        Args:
          row: the text fields, mel float32[mel_frames, n_mels], mel_mask bool[mel_frames],
            modality_mask bool[len(MODALITIES)].
        """
        _, text = self.texts(row)
        if text:
            return self._lookup(text, "request text")
        if not np.asarray(row["modality_mask"])[_SPEECH]:
            raise Undecidable("neither a request text nor a voice")
        mel = np.asarray(row["mel"])[np.asarray(row["mel_mask"], bool)]
        return self._lookup(self.mel_reader.read(mel), "spoken request")

    # ------------------------------------------------------------ earlier turn and cabin
    def action_log(self, row: Mapping[str, np.ndarray]) -> list[list[str]]:
        """[[executed, before], ...] from history_actions / history_before (int32[action_len]
        each); [] when the row has no earlier turn's log."""
        acts, before = np.asarray(row["history_actions"]), np.asarray(row["history_before"])
        if not (acts != PAD_ID).any():
            return []
        executed = self._vocab.decode(acts)  # validates the layout: ids, <eos>, <pad>...
        return [[e, self._vocab.tokens[int(b)]] for e, b in zip(executed, before)]

    def history(self, row: Mapping[str, np.ndarray]) -> tuple[Turn, ...]:
        """The earlier turn the policy may refer to (the latest; the policy reads no other), or ().

        Its request is read from the last text before `<sep>`, its actions and the values they
        replaced from the log; an earlier turn without a log did nothing (`Turn.from_log`)."""
        earlier, _ = self.texts(row)
        log = self.action_log(row)
        if not earlier:
            if log:
                raise Undecidable("an earlier turn's action log without its text")
            return ()
        return (Turn.from_log(self._lookup(earlier[-1], "earlier turn's text"), log),)

    def state(self, row: Mapping[str, np.ndarray], facts: Mapping) -> CabinState:
        """The cabin: state_numeric float32[N], state_categorical int32[M], constraint_tags
        bool[n_tags] of the row, with who sits where, who sleeps and the light from `facts`
        (`perceptual_facts`).

        Raises:
          ValueError: the facts put someone on a seat the seat sensor says is empty, or the reverse.
        """
        occupants = list(facts["occupants"])
        occupied = np.asarray(row["state_categorical"])[-1 - len(SEATS):-1]
        if [o != "empty" for o in occupants] != [bool(x) for x in occupied]:
            raise ValueError(f"the camera's occupants {occupants} disagree with the seat sensors {occupied.tolist()}")
        tags = [t for t, on in zip(CONSTRAINT_TAGS, np.asarray(row["constraint_tags"], bool)) if on]
        return cabin.state_from_features(row["state_numeric"], row["state_categorical"], tags,
                                         [o == "child" for o in occupants], facts["asleep"], bool(facts["dark"]))

    # ------------------------------------------------------------ the answer
    def context(self, row: Mapping[str, np.ndarray], facts: Mapping) -> Context:
        """The policy context rebuilt from the row's inputs and the perceptual facts."""
        return Context(self.state(row, facts), self.request(row), self.history(row), facts.get("voice"))

    def answer(self, row: Mapping[str, np.ndarray], facts: Mapping) -> list[str]:
        """The policy's action tokens (`["<noop>"]` for nothing) for this row.

        Args:
          row: {name: array} of one row (no batch axis) holding at least `INPUT_FIELDS`.
          facts: `perceptual_facts` of the sample the row was made from.
        Raises:
          Undecidable: the inputs do not name a request.
        """
        tokens, _ = policy.policy(self.context(row, facts))
        return tokens or [NOOP]
