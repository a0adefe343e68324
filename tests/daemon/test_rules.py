"""Behaviour tests of the offline rule extractor (smsd.rules) and its scorer.

The labelled fixtures (tests/data/sms_fixtures.jsonl) are real, anonymised
bank SMS; every other text in this file is SYNTHETIC: written for these
tests to look like real Indian bank/wallet SMS, not copied from anywhere.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest

import smsd
from smsd.lab import evaluate as ev
from smsd import rule_tables, rules

DATA = Path(__file__).resolve().parents[1] / "data" / "sms_fixtures.jsonl"
SCHEMA = json.loads((Path(smsd.__file__).parent / "llm_response.schema.json").read_text())
FIXTURES = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
MONEY = re.compile(r"^[0-9]+(\.[0-9]+)?$")
TXN_KEYS = {"direction", "amount", "currency", "channel", "account_mask", "card_mask",
            "counterparty", "reference", "balance", "occurred_at", "bank"}

# Measured on the fixtures when the rules were written: headline 153/153,
# extract_certain answered 135/153 with 135 right (134/153 since issue 17's
# abstentions: a mandate debit is no longer certain).  The bars leave a small
# margin for later rule changes, not for a different data set.
HEADLINE_FLOOR = 0.98
CERTAIN_COVERAGE_FLOOR = 0.85

# --- synthetic texts (invented for these tests) ------------------------------

SYNTHETIC_OTP = [
    "482913 is your OTP for txn of INR 2,500.00 at AMAZON on HDFC Bank card ending 1234. "
    "Valid till 10:32. Do not share OTP for security reasons",
    "Your OTP for login to ICICI Bank internet banking is 771204. Do not share it with anyone.",
    "OTP: 5521 for your SBI Card transaction. Never share it.",
    "Dear Customer, use OTP 903311 to add beneficiary ACME on Axis Mobile. Do not share.",
]
SYNTHETIC_PROMOTION = [
    "Get a pre-approved personal loan of up to Rs 5,00,000 at 10.5% p.a. from HDFC Bank. "
    "Apply now: hdfcbk.io/x T&C apply",
    "Flat Rs.100 cashback on your first UPI payment with Paytm! Offer valid till 31st Mar. T&C",
    "Rs 1.5 Cr home loan at lowest rates! Apply now",
]
SYNTHETIC_BALANCE = [
    "Available balance in your A/c XX1234 is Rs 5,432.10 as on 12-05-24. -Kotak",
    "Your A/c XX5678 balance as on 01-Jun-24 is INR 12,000.00.",
    "Your Amazon Pay balance: Rs 120.00",
]
SYNTHETIC_BILL_DUE = [
    "Your HDFC Bank Credit Card XX1234 statement: Total due Rs 12,345.00, Min due Rs 620.00, "
    "due by 15-Jun-24.",
    "Reminder: Payment of Rs 4,500.00 on your SBI Card ending 1234 is due on 10/07/24.",
]
SYNTHETIC_DECLINED = [
    "Your txn of Rs 1,250.00 at SWIGGY on ICICI Bank Card XX1234 was declined due to incorrect PIN.",
    "UPI txn of Rs 300.00 to merchant@ybl failed. Money if debited will be refunded in 3 working days",
]
#: (text, sender, expected headline and a few fields)
SYNTHETIC_TRANSACTIONS = [
    # account credits read right, the balance apart from the amount (issue 17's fourth kind)
    ("Dear Customer, your A/c XX2468 is credited with INR 3,250.00 on 04-09-26 by NEFT from ACME PVT LTD. "
     "Avl Bal INR 13,250.00 -Canara Bank", None,
     {"direction": "credit", "amount": "3250.00", "currency": "INR", "account_mask": "XX2468",
      "balance": "13250.00", "bank": "canara"}),
    ("Rs.4,000.00 credited to your A/c XX1357 on 02-09-26 by IMPS. Avl Bal Rs.4,100.00 -Bank of India",
     None, {"direction": "credit", "amount": "4000.00", "currency": "INR", "balance": "4100.00"}),
    ("Rs.250.00 debited from a/c **1234 on 05-01-24 to VPA merchant@okaxis(UPI Ref No 401234567890). "
     "Not you? Call on 18002586161 to report", "VM-HDFCBK",
     {"direction": "debit", "amount": "250.00", "currency": "INR", "channel": "upi",
      "counterparty": "merchant@okaxis", "reference": "401234567890", "bank": "hdfc",
      "occurred_at": "2024-01-05"}),
    ("INR 5000.00 withdrawn from A/c no. XX1234 on 10-02-24 at ATM S1AN0001. Avl Bal INR 12,345.67 - Axis Bank",
     None, {"direction": "debit", "amount": "5000.00", "currency": "INR", "channel": "atm",
            "account_mask": "XX1234", "balance": "12345.67", "bank": "axis"}),
    ("Paid Rs.150 to Zomato from Paytm Wallet. Txn ID 23456789012. Updated Balance: Rs 350.00", None,
     {"direction": "debit", "amount": "150", "currency": "INR", "channel": "wallet",
      "counterparty": "Zomato", "balance": "350.00", "bank": "paytm"}),
    ("Rs 500 added to your Paytm Wallet. Updated balance Rs 850.", None,
     {"direction": "credit", "amount": "500", "currency": "INR", "channel": "wallet"}),
    ("USD 25.99 spent on your ICICI Bank Credit Card XX4321 on 20-Apr-24 at NETFLIX.COM. "
     "Avl Lmt: INR 1,20,000.00", None,
     {"direction": "debit", "amount": "25.99", "currency": "USD", "channel": "card",
      "card_mask": "XX4321", "counterparty": "NETFLIX.COM", "balance": "120000.00", "bank": "icici"}),
    ("$49.00 spent on HDFC Bank Card 1234 at GITHUB on 2024-05-01:10:00:00", None,
     {"direction": "debit", "amount": "49.00", "currency": "USD", "occurred_at": "2024-05-01T10:00:00"}),
    ("EUR 12.50 spent on Axis Bank Card no. XX1111 at SPOTIFY on 03-05-24", None,
     {"direction": "debit", "amount": "12.50", "currency": "EUR"}),
    ("You've spent £20.00 at TFL TRAVEL with your Credit Card XX2222", None,
     {"direction": "debit", "amount": "20.00", "currency": "GBP", "counterparty": "TFL TRAVEL"}),
    ("S$ 45.00 spent on your card XX1234 at CHANGI on 01-03-24", None,
     {"direction": "debit", "amount": "45.00", "currency": "SGD"}),
    ("AED 150.00 spent on Kotak Credit Card XX3333 at DUBAI MALL on 04/05/2024", None,
     {"direction": "debit", "amount": "150.00", "currency": "AED", "occurred_at": "2024-05-04"}),
    ("Refund of Rs 499.00 from FLIPKART has been credited to your Axis Bank Credit Card XX1234 on 02-03-24",
     None, {"direction": "credit", "amount": "499.00", "currency": "INR", "channel": "card",
            "counterparty": "FLIPKART"}),
    ("We have received payment of Rs. 15,000.00 towards your Kotak Credit Card XX9876 on 10-Jun-24.",
     None, {"direction": "credit", "amount": "15000.00", "currency": "INR", "card_mask": "XX9876",
            "bank": "kotak"}),
    ("Your A/c XX1234 is credited with INR 25,000.00 on 10-06-24 by NEFT from ACME CORP "
     "(UTR: N123456789012). Avl Bal: INR 30,000.00", None,
     {"direction": "credit", "amount": "25000.00", "currency": "INR", "channel": "neft",
      "counterparty": "ACME CORP", "reference": "N123456789012", "balance": "30000.00"}),
    ("Dear Customer, Your A/C XXXXX1234 has a debit by transfer of Rs 500.00 on 12Jan24. "
     "Avl Bal Rs 10,234.56.-SBI", None,
     {"direction": "debit", "amount": "500.00", "currency": "INR", "account_mask": "XXXXX1234",
      "balance": "10234.56", "occurred_at": "2024-01-12", "bank": "sbi"}),
    ("Rs. 500/- debited from A/c XX1234 on 01-01-24 -Canara Bank", None,
     {"direction": "debit", "amount": "500", "currency": "INR", "bank": "canara"}),
    ("Rs 5,000 transferred to your HDFC Bank A/c XX1234 from RAHUL on 01-01-24", None,
     {"direction": "credit", "amount": "5000", "currency": "INR", "counterparty": "RAHUL"}),
    ("Money received! Rs 750 from PRIYA via UPI in your Jupiter account. Ref 412345678901", None,
     {"direction": "credit", "amount": "750", "currency": "INR", "channel": "upi",
      "counterparty": "PRIYA", "bank": "jupiter"}),
    ("Your payment of Rs.1,234 to BESCOM has been received by the biller. Ref 123456789 -HDFC Bank", None,
     {"direction": "debit", "amount": "1234", "currency": "INR", "counterparty": "BESCOM"}),
    ("RAHUL has sent you Rs 100 on PhonePe", None,
     {"direction": "credit", "amount": "100", "currency": "INR", "bank": "phonepe"}),
]
#: Texts on which the rules must not claim certainty (synthetic).
SYNTHETIC_UNCERTAIN = [
    # two movements in one SMS
    "Your A/c XX1234 credited with Rs 100 and debited with Rs 50 on 05-05-24",
    # announced, not done
    "Your a/c XX0001 will be debited with Rs 999.00 on 05-08-24 towards NETFLIX mandate.",
    # which currency was paid?
    "USD 12.00 | Rs. 1,000.00 spent on your credit card xx1234 at SOMESHOP on 07-09-24",
    # amount with no currency
    "Dear UPI user A/C X1234 debited by 250.00 on date 02Feb24 trf to ACME Refno 412345678901 -SBI",
    # a beneficiary confirmation: "received" but the customer's money went out
    "Your beneficiary ACME LTD has received Rs. 5,000.00 via IMPS. Ref 412345678901 -Yes Bank",
    # failed
    "Txn of Rs 800.00 on your card XX1234 failed due to insufficient balance",
    # marketing around a real credit
    "Congratulations! Rs 50 cashback has been credited to your Paytm Wallet.",
    # an OTP-looking phrase in a debit alert
    "Rs 500 debited from A/c XX1234 on 01-02-24. Do not share OTP for any reason: 1930 -SBI",
    # not recognised at all
    "Your transaction for INR 10000.00 against txn ID 1234567 has been processed successfully.",
    "Dear customer, your KYC is due for update. Visit your branch.",
    "",
    # the four kinds issue 17 found certain and wrong on another project's set (invented texts):
    # a cheque returned is no transaction,
    "Cheque No. 000123 for Rs 25,000.00 deposited in A/c XX1234 has been returned unpaid. -SBI",
    "Your cheque of Rs 25,000.00 deposited in A/c XX1234 is returned. -SBI",
    # an e-mandate notice is not (or not certainly) a payment,
    "E-mandate registered for Rs 1,499.00 on A/c XX5678 for NETFLIX. Next debit on 05-09-26. -HDFC Bank",
    "Your e-mandate of INR 999.00 for SPOTIFY debited from A/c XX1111 on 10-09-26. -Axis Bank",
    # an outgoing NEFT credited to a beneficiary at another bank is no credit to the customer,
    "NEFT Txn of Rs. 10,000.00 from A/c XX4321 has been credited to beneficiary ACME TRADERS at "
    "other bank on 05-09-26. -ICICI Bank",
    "Rs 10,000.00 credited to a/c XX9999 at other bank via NEFT from your A/c XX4321 on 05-09-26",
    # and an OTP quoting a purchase is no spend.
    "OTP for online purchase of Rs. 8,140.50 at SOMESHOP thru State Bank Debit Card 6074*****17 is "
    "512192. Do not share this with anyone.",
]


def _all_answers():
    for row in FIXTURES:
        yield row["id"], rules.extract(row["text"], row["sender"])
    synthetic = (SYNTHETIC_OTP + SYNTHETIC_PROMOTION + SYNTHETIC_BALANCE + SYNTHETIC_BILL_DUE
                 + SYNTHETIC_DECLINED + SYNTHETIC_UNCERTAIN + [t for t, _, _ in SYNTHETIC_TRANSACTIONS])
    for i, text in enumerate(synthetic):
        yield f"synthetic-{i}", rules.extract(text)


def _headline(answer: dict) -> tuple:
    return (answer["kind"],
            [(t["direction"], Decimal(t["amount"]), t["currency"]) for t in answer["transactions"]])


# --- fixtures -------------------------------------------------------------------


def test_headline_rate_on_fixtures():
    result = ev.evaluate(DATA)
    assert result["total"] == 153
    assert result["headline"]["rate"] >= HEADLINE_FLOOR, result["failing"]
    for part in ("kind", "direction", "amount", "currency"):
        assert result["accuracy"][part] >= HEADLINE_FLOOR


def test_field_precision_and_recall_on_fixtures():
    fields = ev.evaluate(DATA)["fields"]
    for name, stats in fields.items():
        assert stats["precision"] >= 0.95, (name, stats)
        assert stats["recall"] >= 0.88, (name, stats)


def test_every_answer_validates_against_the_contract_schema():
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for sms_id, answer in _all_answers():
        validator.validate({"results": [{"id": sms_id, **answer}]})
        for txn in answer["transactions"]:
            assert set(txn) == TXN_KEYS, sms_id  # every optional field present


def test_amounts_are_decimal_strings_never_floats():
    for sms_id, answer in _all_answers():
        for txn in answer["transactions"]:
            assert type(txn["amount"]) is str and MONEY.match(txn["amount"]), sms_id
            assert txn["balance"] is None or (type(txn["balance"]) is str and MONEY.match(txn["balance"]))


def test_extract_certain_is_never_wrong_on_fixtures():
    answered = 0
    for row in FIXTURES:
        answer = rules.extract_certain(row["text"], row["sender"])
        if answer is None:
            continue
        answered += 1
        assert _headline(answer) == _headline(row["expected"]), row["id"]
        assert answer == rules.extract(row["text"], row["sender"])
    assert answered / len(FIXTURES) >= CERTAIN_COVERAGE_FLOOR


def test_rules_do_not_embed_fixture_texts():
    """The fixtures are the evaluation set: no fixture text may be looked up."""
    source = "\n".join(Path(m.__file__).read_text(encoding="utf-8") for m in (rules, rule_tables))
    for row in FIXTURES:
        for line in row["text"].splitlines():
            if len(line) >= 40:
                assert line not in source, row["id"]


# --- synthetic texts ----------------------------------------------------------


@pytest.mark.parametrize("text,sender,want", SYNTHETIC_TRANSACTIONS)
def test_synthetic_transactions(text, sender, want):
    answer = rules.extract(text, sender)
    assert answer["kind"] == "transaction"
    (txn,) = answer["transactions"]
    for key, value in want.items():
        assert txn[key] == value, key


@pytest.mark.parametrize("text", SYNTHETIC_OTP)
def test_synthetic_otp_gives_no_transaction(text):
    assert rules.extract(text) == {"kind": "otp", "transactions": []}
    assert rules.extract_certain(text) == {"kind": "otp", "transactions": []}


@pytest.mark.parametrize("text", SYNTHETIC_PROMOTION)
def test_synthetic_promotion_gives_no_transaction(text):
    assert rules.extract(text) == {"kind": "promotion", "transactions": []}
    assert rules.extract_certain(text) == {"kind": "promotion", "transactions": []}


@pytest.mark.parametrize("text", SYNTHETIC_BALANCE)
def test_synthetic_balance_gives_no_transaction(text):
    assert rules.extract(text) == {"kind": "balance", "transactions": []}


@pytest.mark.parametrize("text", SYNTHETIC_BILL_DUE)
def test_synthetic_bill_due_gives_no_transaction(text):
    assert rules.extract(text) == {"kind": "bill_due", "transactions": []}


@pytest.mark.parametrize("text", SYNTHETIC_DECLINED)
def test_synthetic_declined_gives_no_transaction(text):
    assert rules.extract(text) == {"kind": "declined", "transactions": []}
    assert rules.extract_certain(text) is None


@pytest.mark.parametrize("text", SYNTHETIC_UNCERTAIN)
def test_extract_certain_declines_ambiguous_texts(text):
    assert rules.extract_certain(text) is None


@pytest.mark.parametrize("text,sender,want", SYNTHETIC_TRANSACTIONS[:2])
def test_account_credits_are_certain_and_right(text, sender, want):
    answer = rules.extract_certain(text, sender)
    assert answer is not None
    (txn,) = answer["transactions"]
    assert {k: txn[k] for k in want} == want


# --- the second labelled set (scoring only: the rules are not written from it) ------

SECOND = Path(__file__).resolve().parents[1] / "data" / "finlight" / "sms.jsonl"
# Measured when extract_certain was made to abstain (issue 17): 69/140 answered, 0 wrong.
SECOND_CERTAIN_COVERAGE_FLOOR = 0.45


def test_extract_certain_is_never_wrong_on_the_second_set():
    result = ev.evaluate(SECOND, certain_extractor=rules.extract_certain)
    assert result["total"] == 140
    assert result["certain"]["wrong"] == []
    assert result["certain"]["coverage"] >= SECOND_CERTAIN_COVERAGE_FLOOR


def test_the_second_set_keeps_its_licence_and_names_no_customer():
    folder = SECOND.parent
    assert "Apache License" in (folder / "LICENSE").read_text()
    assert "Apache License, Version 2.0" in (folder / "README.md").read_text()
    texts = SECOND.read_text(encoding="utf-8")
    assert "Madhyastha" not in "".join(json.loads(line)["text"] for line in texts.splitlines())


def test_evaluate_compares_only_the_labelled_parts(tmp_path):
    data = tmp_path / "partial.jsonl"
    rows = [{"id": "x/no-currency", "text": "Rs 5 debited", "labelled": ["kind", "direction", "amount"],
             "expected": {"kind": "transaction", "transactions": [
                 {"direction": "debit", "amount": "5.0", "currency": None}]}},
            {"id": "x/undecided", "text": "t", "labelled": ["kind"],
             "expected": {"kind": None, "transactions": []}}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def debit(text, sender=None):
        return {"kind": "transaction", "transactions": [
            {"direction": "debit", "amount": "5", "currency": "INR", "bank": "x"}]}

    result = ev.evaluate(data, debit, certain_extractor=debit)
    assert result["headline"]["matched"] == 1        # the currency is not labelled
    assert result["fields"]["bank"] == {"tp": 0, "fp": 0, "fn": 0, "precision": None, "recall": None}
    assert result["certain"]["wrong"] == ["x/undecided"]   # any certain answer on kind null is wrong


@pytest.mark.parametrize("written,amount", [
    ("Rs 1,23,456.78", "123456.78"),
    ("INR 12,00,000", "1200000"),
    ("Rs.99,99,999.99", "9999999.99"),
    ("₹1,000", "1000"),
    ("INR 123,456.70", "123456.70"),  # western grouping, trailing zero kept
    ("Rs.3000", "3000"),
    ("Rs. 12,345.00", "12345.00"),
])
def test_indian_grouping_and_trailing_zeros(written, amount):
    # synthetic
    answer = rules.extract(f"{written} debited from A/c XX1234 on 01-02-24. Avl Bal Rs 10,00,000.50 -ICICI Bank")
    (txn,) = answer["transactions"]
    assert txn["amount"] == amount
    assert txn["balance"] == "1000000.50"


@pytest.mark.parametrize("when,iso", [
    ("on 05-01-24", "2024-01-05"),
    ("on 5/1/2024 at 7:05 PM", "2024-01-05T19:05"),
    ("on 05-Jan-24 12:15:30", "2024-01-05T12:15:30"),
    ("on 05 January 2024 12:05 AM", "2024-01-05T00:05"),
    ("on 2024-01-05:23:59:59", "2024-01-05T23:59:59"),
    ("on 05Jan24", "2024-01-05"),
    ("on 05-01", None),  # no year: null, never guessed
])
def test_occurred_at_formats(when, iso):
    # synthetic
    answer = rules.extract(f"Rs 100.00 debited from A/c XX1234 {when}. -Axis Bank")
    assert answer["transactions"][0]["occurred_at"] == iso


@pytest.mark.parametrize("sender,bank", [
    ("VM-HDFCBK", "hdfc"), ("AX-ICICIB-S", "icici"), ("JD-SBIINB", "sbi"), ("AD-KOTAKB", "kotak"),
    ("AX-OneCrd-S", "onecard"), (None, None),
])
def test_bank_from_sender(sender, bank):
    # synthetic: the text names no bank, so only the sender can
    answer = rules.extract("Rs 100.00 debited from A/c XX1234 on 01-02-24.", sender)
    assert answer["transactions"][0]["bank"] == bank


def test_long_input_stays_fast():
    # synthetic garbage: the patterns are bounded, so no catastrophic backtracking
    import time
    for text in ("1" * 5000 + " debited", "Rs 5 debited at x " * 500, "A/c " + "X" * 5000,
                 "to x " * 2000, "x" * 10000 + "@"):
        start = time.monotonic()
        rules.extract(text)
        rules.extract_certain(text)
        assert time.monotonic() - start < 2.0


def test_odd_input_does_not_raise():
    for text in ("", "   ", "\n\n", "Rs", "debited", "₹", "1,2,3,4,5,6,7,8,9,0" * 50):
        answer = rules.extract(text)
        assert answer["kind"] in ("other", "balance", "promotion")
        assert answer["transactions"] == []


# --- the evaluate command -----------------------------------------------------


def test_evaluate_main_json_prints_ids_not_texts(capsys):
    assert ev.main(["--data", str(DATA), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["headline"]["total"] == 153
    assert set(result["by_bank"]) == {row["id"].split("/")[0] for row in FIXTURES}
    assert result["certain"]["wrong"] == []
    for row in FIXTURES:
        assert row["text"] not in out


def test_evaluate_main_table(capsys):
    assert ev.main(["--data", str(DATA)]) == 0
    out = capsys.readouterr().out
    assert "headline" in out and "precision" in out and "hdfc" in out


def test_evaluate_counts_misses_and_false_positives(tmp_path):
    # synthetic fixture file: one SMS, an extractor that gets the bank wrong
    # and misses the channel
    data = tmp_path / "one.jsonl"
    expected = {"kind": "transaction", "transactions": [{
        "direction": "debit", "amount": "10.0", "currency": "INR", "channel": "upi",
        "account_mask": None, "card_mask": None, "counterparty": None, "reference": None,
        "balance": "5", "occurred_at": None, "bank": "hdfc"}]}
    data.write_text(json.dumps({"id": "x/one", "text": "t", "sender": None, "expected": expected}) + "\n")

    def fake(text, sender=None):
        txn = dict(expected["transactions"][0], amount="10.00", balance="5.00", bank="icici", channel=None)
        return {"kind": "transaction", "transactions": [txn]}

    result = ev.evaluate(data, fake)
    assert result["headline"]["matched"] == 1  # 10.00 == 10.0 as numbers
    assert result["fields"]["balance"]["tp"] == 1
    assert result["fields"]["bank"] == {"tp": 0, "fp": 1, "fn": 1, "precision": 0.0, "recall": 0.0}
    assert result["fields"]["channel"]["fn"] == 1 and result["fields"]["channel"]["fp"] == 0
    assert result["by_bank"]["x"]["rate"] == 1.0
