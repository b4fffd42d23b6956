"""PII scrubbing: each type found in Chinese and English text, look-alikes left alone, PII never written out."""

from __future__ import annotations

import pytest

from finetune.data.pii import FINDERS, NameList, Scrubber, id_card_valid, luhn_valid, name_detector
from finetune.errors import WenmaiError

ALL = Scrubber(tuple(FINDERS))


def with_check_digit(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11]


def with_luhn(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if luhn_valid(prefix + str(d)))


ID = with_check_digit("11010519491231002")  # ends in X
ID2 = with_check_digit("44030619851012341")
CARD = with_luhn("622202001234567890")  # UnionPay, 19 digits
VISA = with_luhn("411111111111111")


@pytest.mark.parametrize(
    ("template", "value", "kind", "placeholder"),
    [
        ("我的身份证号码是{}，请核对。", ID, "id_card", "<ID_CARD>"),
        ("Resident ID {} was on the donor form.", ID2, "id_card", "<ID_CARD>"),
        ("捐赠人手机{}，周末可联系。", "13812345678", "mobile", "<PHONE>"),
        ("Call the donor on {} after 6 pm.", "+86 139 1234 5678", "mobile", "<PHONE>"),
        ("馆办电话：{}，工作日开放。", "010-65131892", "landline", "<PHONE>"),
        ("The archive desk is on {}.", "(0571) 8765 4321", "landline", "<PHONE>"),
        ("来信请寄{}，谢谢。", "zhang.wei@museum.org.cn", "email", "<EMAIL>"),
        ("Write to {} for access.", "curator_li@example.com", "email", "<EMAIL>"),
        ("退款转入银行卡{}。", CARD, "bank_card", "<BANK_CARD>"),
        ("Card {} was charged.", f"{VISA[:4]} {VISA[4:8]} {VISA[8:12]} {VISA[12:]}", "bank_card", "<BANK_CARD>"),
        ("护照号码：{}，有效期十年。", "E12345678", "passport", "<PASSPORT>"),
        ("Passport No. {} (issued abroad).", "K1234567", "passport", "<PASSPORT>"),
        ("访问日志里的地址是{}。", "192.168.10.25", "ip", "<IP>"),
        ("The scanner at {} uploaded it.", "2001:db8:85a3::8a2e:370:7334", "ip", "<IP>"),
    ],
)
def test_each_pii_type_is_masked_in_chinese_and_english(template, value, kind, placeholder):
    scrubbed, counts = ALL.scrub(template.format(value))
    assert counts == {kind: 1}, (scrubbed, counts)
    assert scrubbed == template.format(placeholder)  # the whole value and nothing else: `+86 1<PHONE>` fails


@pytest.mark.parametrize(
    "text",
    [
        f"编号{ID[:17]}{'0' if ID[17] != '0' else '1'}不是身份证：校验位不对。",  # 18 digits, bad check digit
        "Object 110105194913310021 has an impossible birth date (month 13).",
        "明朝（1368-1644）共历十六帝，清朝1644—1911年。",
        "The Ming dynasty (1368-1644) and the Qing (1644–1911).",
        "故宫 00012345 号藏品，另见故宫00012345。",
        "Accession number Inv. 2019.123.4, formerly 1949.10.1.2; catalogue no. 2019-123456.",
        "ISBN 978-7-101-00306-6, 定价 68.00 元，印数 1-3000 册。",
        "坐标 39.9163, 116.3972；会议于 2023-10-01 10:30:00 举行。",
        "Bronze vessel, 60 x 45 cm, c. 1200 BCE; see plate 12:34 and version 2.1.3.",
        "电话区号一览表收录了 368 个区号。李白（701—762）。",
        "Ticket 1234 5678 9012 3456 is a raffle number, not a card (fails Luhn).",
        "详见第2.1.3.4节；see section 2.1.3.4 and 2.1.3.4 in the catalogue.",  # outline numbers, not addresses
        "藏品总登记号13912345678，现藏库房。Inventory 18612345678 lists the bronzes.",  # 11 digits, no phone word
    ],
)
def test_look_alikes_are_not_masked(text):
    scrubbed, counts = ALL.scrub(text)
    assert not counts, counts
    assert scrubbed == text


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("联系王女士13812345678（微信同号）", "联系王女士<PHONE>（微信同号）"),
        ("The donor left 13812345678 with the guard.", "The donor left <PHONE> with the guard."),  # no word: a phone
        ("手机号13812345678", "手机号<PHONE>"),  # 号 before it, but a phone word too
        ("tel:13812345678", "tel:<PHONE>"),
        ("13812345678（手机）", "<PHONE>（手机）"),
        ("捐赠人 +8613812345678 与 138-1234-5678", "捐赠人 <PHONE> 与 <PHONE>"),
        ("服务器 10.0.0.1 与 10.0.0.2:8080；from 1.1.1.1", "服务器 <IP> 与 <IP>:8080；from <IP>"),
        ("The log shows 192.168.10.25.", "The log shows <IP>."),
    ],
)
def test_ambiguous_numbers_are_masked_where_the_context_names_them(text, scrubbed):
    assert ALL.scrub(text)[0] == scrubbed


def test_overlapping_findings_count_once_as_the_longer_span():
    scrubbed, counts = ALL.scrub("邮箱13812345678@163.com")
    assert scrubbed == "邮箱<EMAIL>" and counts == {"email": 1}


def test_checksums():
    assert id_card_valid(ID) and not id_card_valid(ID[:17] + ("1" if ID[17] != "1" else "2"))
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_name_list_masks_listed_names_only(tmp_path):
    names = tmp_path / "donors.txt"
    names.write_text("张伟\nMary Smith\n", encoding="utf-8")
    scrubber = Scrubber((), name_detector("list", str(names)))
    scrubbed, counts = scrubber.scrub("捐赠人张伟与Mary Smith；Smithsonian 不是人名。")
    assert scrubbed == "捐赠人<PERSON>与<PERSON>；Smithsonian 不是人名。" and counts == {"person": 2}


def test_unknown_name_detector_is_named():
    with pytest.raises(WenmaiError, match="no person-name detector 'hanlp'"):
        name_detector("hanlp", None)


def test_missing_name_list_is_named(tmp_path):
    with pytest.raises(WenmaiError, match="name_list: .*nope.txt not found"):
        NameList.from_file(tmp_path / "nope.txt")


def test_full_width_digits_are_found_and_masked_in_place():
    scrubbed, counts = ALL.scrub(
        "电话：１３８１２３４５６７８，身份证" + ID.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789X"})
    )
    assert scrubbed == "电话：<PHONE>，身份证<ID_CARD>" and counts == {"mobile": 1, "id_card": 1}


def test_no_personal_data_is_found_in_the_shipped_sample_data():
    import json
    from pathlib import Path

    texts = []
    for path in (Path(__file__).resolve().parent.parent / "recipes" / "data").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts += [m["content"] for m in record.get("messages", [])] + [
                record.get(k, "") for k in ("instruction", "input", "output")
            ]
    assert len(texts) > 1000
    assert [t for t in texts if ALL.find(t)] == []  # 330+ years, dates, dimensions and inscription years, none masked
