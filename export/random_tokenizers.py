"""Small tokenizers for the random checkpoints, written in the layouts the real repositories ship.

CLIP BPE (vocab.json + merges.txt, saved by transformers) for SD 1.x/2.x/SDXL, and a Chinese-BERT WordPiece
vocabulary (vocab.txt + tokenizer_config.json + special_tokens_map.json, *no* tokenizer.json) for Taiyi, whose
repo ships only those files, so whatever converts tokenizers must cope with that layout too.
"""

from __future__ import annotations

import json
from pathlib import Path

# Special tokens of the CLIP BPE vocabulary (openai/clip-vit-large-patch14).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenCLIP's tokenizer (SD 2.x, SDXL tokenizer_2) pads with "!", the first byte symbol: id 0, a real BPE token.
OPENCLIP_PAD = "!"

CLIP_WORDS = ("a", "red", "circle", "photo", "of", "cat")

# Chinese BERT (hfl/chinese-roberta-wwm-ext, Taiyi's vocab.txt) keeps these ids; [unused1..99] fill 1..99.
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
# Enough characters for the Taiyi model card's prompts and negative prompt, plus common ones around them.
CHINESE_CHARS = (
    "一只可爱的猫宝梦皮卡丘飞流直下三千尺油画广告资讯新闻水印"
    "的是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要以生会自着去之过家学对她里后小么心多天"
    "而能好都然没日于起还发成事作当想看文无开手十用主行方又如前所本见经头面公同已老从动两长知民样现分将外但身些"
    "与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第"
    "门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性"
    "通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任"
    "至清物台象记边共风战干接它许八特觉望服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非每青管"
    "夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众"
    "技轻程江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商片容研像找友孩站改议形委早房音火际"
    "则首单据导影失拿网香似斯专石若兵弟谁校读志观争究包组造落视济喜离虽坏兴切图阿狗鸟鱼龙虎马云雪雨月星夜春秋"
)
# Full-width punctuation used in Chinese prompts; BERT's basic tokenizer splits each into its own token.
CHINESE_PUNCTUATION = "，。！？；：、“”‘’（）《》"
ENGLISH_WORDS = ("a", "an", "the", "of", "and", "in", "on", "with", "photo", "painting", "cat", "dog", "red",
                 "blue", "circle", "cute", "oil", "style", "art", "high", "quality", "pi", "mountain", "river")
WORD_PIECES = ("##s", "##es", "##ed", "##ing", "##er", "##ly", "##ka", "##chu")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (the base alphabet of CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = CLIP_WORDS, pad: str = EOS) -> int:
    """Write a small CLIP BPE tokenizer (vocab.json + merges.txt layout); returns the vocabulary size.

    The vocabulary is built the way CLIP builds its own: the 256 byte symbols, the same with `</w>`, the merges,
    then the two special tokens. A handful of merges spell `words` so that common prompts are short. `pad` is
    EOS for CLIP-L (SD 1.x, SDXL tokenizer) and "!" for OpenCLIP (SD 2.x, SDXL tokenizer_2).
    """
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77, pad_token=pad)
    tokenizer.save_pretrained(folder)
    return len(vocab)


def bert_vocab() -> list[str]:
    """A few hundred WordPiece tokens at the Chinese-BERT special-token ids."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert all(vocab[i] == tok for tok, i in BERT_SPECIALS.items())
    ascii_chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    # "##x" for every lowercase letter and digit: any lower-cased ASCII word splits into pieces, never [UNK].
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(WORD_PIECES)
    rest = ascii_chars + pieces + list(ENGLISH_WORDS) + list(CHINESE_PUNCTUATION) + list(CHINESE_CHARS)
    for tok in rest:
        if tok not in vocab:
            vocab.append(tok)
    return vocab


def write_bert_tokenizer(folder: Path, model_max_length: int = 512) -> int:
    """Write a BertTokenizer folder as Taiyi's repo ships it; returns the vocabulary size.

    Files are written directly (not via save_pretrained) because transformers 5 would add a tokenizer.json,
    which the real repo lacks.
    """
    vocab = bert_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(tok + "\n" for tok in vocab), encoding="utf-8")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    config = dict(
        do_lower_case=True,
        do_basic_tokenize=True,
        never_split=None,
        tokenize_chinese_chars=True,
        strip_accents=None,
        model_max_length=model_max_length,
        tokenizer_class="BertTokenizer",
        **specials,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return len(vocab)
