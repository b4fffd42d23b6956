"""Precision and recall of each PII detector on a labelled set, plus false positives on real text.

    python scripts/bench/pii_eval.py            # regenerate scripts/bench/pii_labelled.jsonl (seed 0) and score it
    python scripts/bench/pii_eval.py --real /work/shared/data   # also count findings in real text (CMMLU, CValues)

How the labelled set is built: for each type, values are generated the way they occur (valid check
digits and birth dates for resident ids, Luhn-valid numbers with real card prefixes, mobile and
landline numbers in the common Chinese and international spellings, e-mail addresses on Chinese and
Western domains, Chinese passport numbers bare and other passports after a label, IPv4 and IPv6) and
put into Chinese and English sentences; hard negatives are the look-alikes cultural text is full of
(ids with a wrong check digit or impossible date, year ranges, dates, accession and catalogue
numbers, ISBNs, prices, measurements, coordinates, times, version and section numbers). The same
person wrote the detectors and the set, so recall here is an upper bound; the real-text count
(sample data, CMMLU questions, CValues prompts: no personal data expected) checks precision on text
nobody wrote for this test.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from finetune.data.pii import FINDERS, Scrubber, luhn_valid

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SET = HERE / "pii_labelled.jsonl"
ZH = {
    "id_card": ["捐赠人身份证号码为{}。", "身份证：{}，请核对。", "登记表上写着{}这个证件号。"],
    "mobile": ["联系人电话{}，工作日可打。", "请拨打{}预约参观。", "手机：{}"],
    "landline": ["馆办电话：{}。", "咨询请致电{}（工作日）。", "档案室电话{}"],
    "email": ["来信请寄{}。", "邮箱：{}，欢迎投稿。", "请发送至{}，注明“捐赠”。"],
    "bank_card": ["退款将转入银行卡{}。", "卡号：{}，开户行北京分行。", "请向{}汇款。"],
    "passport": ["护照号码：{}，有效期十年。", "持护照{}入境。", "外宾护照号{}已登记。"],
    "ip": ["访问日志中的地址是{}。", "服务器{}上的扫描件已备份。", "来自{}的请求被拒绝。"],
}
EN = {
    "id_card": ["The donor's resident ID is {}.", "ID number {} was on the loan form."],
    "mobile": ["Call the donor on {} after 6 pm.", "Mobile: {}"],
    "landline": ["The archive desk is on {}.", "Phone {} (weekdays)."],
    "email": ["Write to {} for access.", "Contact: {}"],
    "bank_card": ["Card {} was charged for the ticket.", "Refund to card number {}."],
    "passport": ["Passport No. {} (issued abroad).", "The visitor showed passport {}."],
    "ip": ["The scanner at {} uploaded it.", "Requests from {} were blocked."],
}
NEGATIVES = [
    "明朝（1368-1644）共历十六帝，清朝1644—1911年。",
    "The Ming dynasty (1368-1644) and the Qing (1644–1911).",
    "公元前221年—前206年为秦朝。",
    "会议于2023-10-01 10:30:00在故宫举行。",
    "The exhibition runs 2024-03-01 to 2024-06-30.",
    "故宫00012345号藏品。",
    "故宫 00012345 号藏品",
    "新00123456，旧藏清宫。",
    "Accession number Inv. 2019.123.4.",
    "British Museum 1982,0101.1 and EA 10470.",
    "Object no. 1949.10.1.2 in the old register.",
    "Gu 00012345, a Ru ware dish.",
    "ISBN 978-7-101-00306-6，定价 68.00 元。",
    "ISSN 1000-0003, vol. 12, pp. 123-145.",
    "印数 1-3000 册，字数 320 千字。",
    "高 60 厘米，口径 45 厘米，重 832.84 千克。",
    "Bronze vessel, 60 x 45 cm, 832.84 kg.",
    "坐标 39.9163, 116.3972。",
    "See plate 12:34 and version 2.1.3.",
    "第3.1.2节另有说明。",
    "馆藏共计1381234567件次（累计）。",
    "观众人次 13,812,345,678。",
    "Ticket 1234 5678 9012 3456 is a raffle number.",
    "李白（701—762），杜甫（712—770）。",
    "The 18-digit catalogue code 110105194913310021 has no meaning.",
    "邮编100009，北京市东城区景山前街4号。",
    "展厅编号 A-0571-8765。",
    "Room 010-B, shelf 6512.",
    "Call number PL2658.E8 1999.",
    "@故宫博物院 发布了新展讯。",
    "user@localhost is not an address.",
    "温度 12.5°C，湿度 45%。",
    "1911年10月10日武昌起义。",
    "Song dynasty (960–1279).",
    "详见第2.1.3.4节。",
    "See section 2.1.3.4 of the catalogue.",
    "图录 2.1.3.4 收录了这件瓷器。",
    "Firmware 10.2.0.17 runs the display case.",
    "藏品总登记号13912345678，现藏库房。",
    "馆藏数字资源共15012345678字节。",
    "Inventory 18612345678 lists the bronzes.",
]


# spellings seen in real documents that the detectors were not tuned on: counted in recall as they come
HARD_FORMS = [
    ("电话：１３８１２３４５６７８（全角数字）", "mobile", "１３８１２３４５６７８"),
    ("身份证号１１０１０５１９４９１２３１００２Ｘ", "id_card", "１１０１０５１９４９１２３１００２Ｘ"),
    ("身份证号 110105 19491231 002X（分段书写）", "id_card", "110105 19491231 002X"),
    ("总机010-65131892转8001", "landline", "010-65131892转8001"),
    ("Phone +86-10-6513-1892 ext. 8001", "landline", "+86-10-6513-1892"),
    ("手机号138-1234-5678，微信同号", "mobile", "138-1234-5678"),
    ("邮箱 li.ming[at]example.com（防垃圾邮件写法）", "email", "li.ming[at]example.com"),
    ("E-mail: Li.Ming@Example.COM", "email", "Li.Ming@Example.COM"),
    ("护照号码为E 1234 5678", "passport", "E 1234 5678"),
    ("server 192.168.1.10:8080 logged it", "ip", "192.168.1.10"),
    ("卡号6222-0212-3456-7890-128已挂失", "bank_card", "6222-0212-3456-7890-128"),
    ("tel:13812345678", "mobile", "13812345678"),
]


def id_number(rng: random.Random) -> str:
    region = rng.choice(["110101", "110105", "310104", "440305", "510107", "330106", "620102", "420111", "650102"])
    birth = f"{rng.randint(1935, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body = region + birth + f"{rng.randint(0, 999):03d}"
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    check = "10X98765432"[sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 11]
    return body + (check.lower() if check == "X" and rng.random() < 0.3 else check)


def mobile(rng: random.Random) -> str:
    n = rng.choice(["13", "15", "17", "18", "19"]) + "".join(str(rng.randint(0, 9)) for _ in range(9))
    style = rng.randrange(5)
    return [n, f"{n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}", f"+86 {n}", f"+86 {n[:3]} {n[3:7]} {n[7:]}"][
        style
    ]


def landline(rng: random.Random) -> str:
    area = rng.choice(["010", "021", "020", "022", "0571", "0755", "028", "0931", "0991", "0851"])
    local = str(rng.randint(2, 8)) + "".join(
        str(rng.randint(0, 9)) for _ in range(7 if len(area) == 3 else rng.choice([6, 7]))
    )
    style = rng.randrange(4)
    return [f"{area}-{local}", f"({area}) {local[:-4]} {local[-4:]}", f"{area} {local}", f"+86 {area[1:]} {local}"][
        style
    ]


def email(rng: random.Random) -> str:
    user = rng.choice(["zhangwei", "li.na", "wang_fang88", "curator", "chen.jie", "m.smith", "archive-desk", "liu2021"])
    return (
        f"{user}@{rng.choice(['163.com', 'qq.com', 'dpm.org.cn', 'museum.org.cn', 'example.edu', 'mail.bnu.edu.cn'])}"
    )


def bank_card(rng: random.Random) -> str:
    prefix, length = rng.choice([("62", 16), ("62", 19), ("4", 16), ("51", 16), ("55", 16)])
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    n = next(body + str(d) for d in range(10) if luhn_valid(body + str(d)))
    return " ".join(n[i : i + 4] for i in range(0, len(n), 4)) if rng.random() < 0.4 else n


def passport(rng: random.Random, zh: bool) -> str:
    digits = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))  # noqa: E731
    if zh:
        return rng.choice([f"E{digits(8)}", f"E{rng.choice('ABCDEFGHJK')}{digits(7)}", f"G{digits(8)}"])
    return rng.choice([f"K{digits(7)}", f"X{digits(8)}", f"E{digits(8)}", digits(9)])


def ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1 if i == 0 else 0, 254)) for i in range(4))
    return rng.choice(
        ["2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2409:8a00:1::5"]
    )


def build(seed: int = 0, per_template: int = 6) -> list[dict]:
    rng = random.Random(seed)
    makers = {
        "id_card": id_number,
        "mobile": mobile,
        "landline": landline,
        "email": email,
        "bank_card": bank_card,
        "ip": ip,
    }
    rows = []
    for lang, templates in (("zh", ZH), ("en", EN)):
        for kind, patterns in templates.items():
            for pattern in patterns:
                for _ in range(per_template):
                    value = passport(rng, lang == "zh") if kind == "passport" else makers[kind](rng)
                    start = pattern.index("{}")
                    rows.append(
                        {
                            "text": pattern.format(value),
                            "lang": lang,
                            "spans": [{"type": kind, "start": start, "end": start + len(value)}],
                        }
                    )
    for text, kind, value in HARD_FORMS:
        start = text.index(value)
        rows.append(
            {"text": text, "lang": "hard", "spans": [{"type": kind, "start": start, "end": start + len(value)}]}
        )
    rows += [{"text": text, "lang": "negative", "spans": []} for text in NEGATIVES]
    return rows


def score(rows: list[dict]) -> dict[str, Counter]:
    """True positives, false positives and false negatives per type (a finding matches an overlapping labelled span)."""
    scrubber = Scrubber(tuple(FINDERS))
    counts: dict[str, Counter] = {kind: Counter() for kind in FINDERS}
    phone = {"mobile", "landline"}
    for row in rows:
        found = scrubber.find(row["text"])
        gold = [(s["start"], s["end"], s["type"]) for s in row["spans"]]
        for start, end, kind in found:
            hit = any(start < e and s < end and (k == kind) for s, e, k in gold)
            counts[kind]["tp" if hit else "fp"] += 1
        for s, e, k in gold:
            if not any(start < e and s < end and kind == k for start, end, kind in found):
                counts[k]["fn"] += 1
                if any(start < e and s < end and {kind, k} <= phone for start, end, kind in found):
                    counts[k]["fn_other_phone_type"] += 1
    return counts


def real_text(shared: Path | None) -> list[str]:
    texts = []
    for name in ("culture_sft.jsonl", "culture_instructions.jsonl"):
        for line in (ROOT / "recipes" / "data" / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [m["content"] for m in record.get("messages", [])] + [
                record.get(k, "") for k in ("instruction", "input", "output")
            ]
    if shared is not None:
        import csv

        for path in sorted((shared / "cmmlu").rglob("*.csv")):
            with path.open(encoding="utf-8", newline="") as f:
                texts += [" ".join(v for k, v in row.items() if k) for row in csv.DictReader(f)]
        prompts = shared / "cvalues" / "responsibility_prompts.jsonl"
        if prompts.is_file():
            texts += [
                json.loads(line)["prompt"] for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--real", type=Path, default=None, help="folder with cmmlu/ and cvalues/ (e.g. /work/shared/data)"
    )
    args = parser.parse_args()
    rows = build()
    SET.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    positives = Counter(s["type"] for r in rows for s in r["spans"])
    print(
        f"{SET.relative_to(ROOT)}: {len(rows)} texts, {sum(positives.values())} labelled spans, {len(NEGATIVES)} hard negatives"
    )
    print(f"{'type':10s} {'spans':>5s} {'precision':>9s} {'recall':>7s}  (tp/fp/fn)")
    for kind, c in score(rows).items():
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
        print(f"{kind:10s} {positives[kind]:5d} {precision:9.3f} {recall:7.3f}  ({c['tp']}/{c['fp']}/{c['fn']})")
    texts = real_text(args.real)
    scrubber = Scrubber(tuple(FINDERS))
    found = Counter(kind for t in texts for _, _, kind in scrubber.find(t))
    print(
        f"real text without personal data ({len(texts)} texts, {sum(map(len, texts)):,} characters): findings {dict(found) or 'none'}"
    )
    for t in texts:  # show them, so each can be judged (there is no personal data in these sets)
        for start, end, kind in scrubber.find(t):
            print(f"  {kind}: ...{t[max(0, start - 15) : end + 15]!r}...")


if __name__ == "__main__":
    main()
