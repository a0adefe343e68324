"""The rule tables of the offline extractor (:mod:`smsd.rules`): data, not logic.

The compiled patterns and form definitions the matcher in :mod:`smsd.rules`
walks: the money grammar (``AMT``, ``AMT_OPT``, currency symbols), the ordered
transaction :data:`FORMS`, the wording of kinds that carry no transaction
(OTP, promotion, decline, bill, doubt), the field patterns (masks, references,
balances, dates), the counterparty forms (:data:`PARTIES`) and narrations, the
channel keywords and the bank names and sender codes.  They live apart so the
tables can grow (a new bank, a new SMS form) without touching the functions
that read them, and the functions can be read without scrolling past five
hundred lines of regular expressions.  Every table is ordered: the first entry
that matches wins.  Only the standard library is used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_I = re.IGNORECASE

# ---------------------------------------------------------------------------
# Money
# ---------------------------------------------------------------------------

#: ISO 4217 codes accepted when written out in an SMS, in capitals only (the
#: patterns are case-insensitive, and "try 2 times" is not 2 Turkish lira).
_ISO = ("(?-i:INR|USD|EUR|GBP|SGD|AED|JPY|AUD|CAD|CHF|HKD|SAR|QAR|KWD|OMR|BHD|THB|MYR|"
        "CNY|NZD|ZAR|LKR|NPR|IDR|VND|KRW|SEK|NOK|DKK|BDT)")
#: A currency written before the amount: ISO code, "Rs", "Rs.", "INR", "₹",
#: "$" (also "US$", "S$", ...), "€", "£".
_CUR_PRE = rf"(?<![A-Za-z])(?:{_ISO}|rs|inr)(?![A-Za-z])|₹|(?<![A-Za-z])(?:US|S|A|C|HK|NZ)?\$|€|£"
#: Indian ("1,23,456.78") or western ("123,456.78") grouping, or none.
_NUM = r"\d{1,3}(?:,\d{2,3}){1,6}(?:\.\d{1,6})?|\d{1,15}(?:\.\d{1,6})?"
#: An amount with its currency, before or after the number.
AMT = (rf"(?:(?P<cur>{_CUR_PRE})\s*[.:]?\s*(?P<num>{_NUM})(?!\d|,\d)(?:/-)?"
       rf"|(?<![\d,.])(?P<num2>{_NUM})\s*(?P<cur2>{_ISO})(?![A-Za-z]))")
#: An amount that may also be written with no currency at all ("debited by
#: 100.00"): then INR is assumed, and the form is never trusted as certain.
AMT_OPT = rf"(?:{AMT}|(?<![\d,.])(?P<bare>\d{{1,15}}\.\d{{2}})(?!\d|,\d))"

_SYMBOLS = {"₹": "INR", "RS": "INR", "$": "USD", "US$": "USD", "S$": "SGD", "A$": "AUD",
            "C$": "CAD", "HK$": "HKD", "NZ$": "NZD", "€": "EUR", "£": "GBP"}

_ANY_AMOUNT_RE = re.compile(AMT, _I)
#: "will be / to be" right before a form's match: announced, not done.
_FUTURE_RE = re.compile(r"\b(?:will|to|shall|would)\s+be\s+$", _I)

# ---------------------------------------------------------------------------
# Transaction forms
# ---------------------------------------------------------------------------

#: Channel markers for :class:`Form`.  ``CARD_IF_CARD``: the form is card
#: related only when the SMS names a card (refunds and reversals).
CARD_IF_CARD = "card?"


@dataclass(frozen=True)
class Form:
    """One SMS form that states a money movement.

    ``pattern`` contains exactly one amount group (``AMT`` or ``AMT_OPT``).
    ``channel`` is the form's own channel, ``scan`` says whether keywords
    elsewhere in the SMS (UPI, NEFT, ...) may supply one.  ``kind``:
    ``plain``; ``card_payment`` (a payment towards a card); ``refund`` (a
    refund or reversal: "failed" in it does not make it a decline);
    ``outward`` (a credit-worded confirmation of an outgoing transfer) and
    ``loose`` (amount and verb some words apart), both never certain.
    """

    name: str
    direction: str
    pattern: re.Pattern
    channel: str | None = None
    scan: bool = True
    kind: str = "plain"


def _form(name: str, direction: str, pattern: str, **kw) -> Form:
    text = pattern.replace("{AMT_OPT}", AMT_OPT).replace("{AMT}", AMT)
    return Form(name, direction, re.compile(text, _I), **kw)


#: Ordered: the first form that matches decides direction and amount.
FORMS: tuple[Form, ...] = (
    # The confirmation legs of an *outward* transfer say "credited" or
    # "received", but seen from the customer they repeat a debit, so they
    # come first.
    _form("beneficiary_received", "debit",
          r"beneficiary\s+.{1,60}?\s+has\s+received\s+{AMT}", kind="outward"),
    _form("credited_to_beneficiary", "debit",
          r"{AMT}\s+has\s+been\s+credited\s+to\s+(?:the\s+)?beneficiary", kind="outward"),
    _form("deposited_to_payee", "debit",
          r"deposited\W{1,3}{AMT}\W{1,3}to\s+(?!your\b)", kind="outward"),

    # Payments received towards a credit card (credits).  The repository's
    # "card" channel on these is the instrument, not how the customer paid,
    # so only an explicit "via UPI/NEFT..." sets a channel.
    _form("payment_received", "credit",
          r"payment\s+of\s+{AMT}(?:\s+vide\s+\S+\s+\S+)?\s+(?:has\s+been\s+|was\s+|is\s+)?"
          r"(?:successfully\s+)?(?:received|credited)",
          scan=False, kind="card_payment"),
    _form("thanks_for_payment", "credit",
          r"thank\s+you\s+for\s+(?:the\s+|your\s+)?payment\s+of\s+{AMT}",
          scan=False, kind="card_payment"),
    _form("received_a_payment", "credit",
          r"received\s+(?:a\s+)?payment\s+of\s+{AMT}", scan=False, kind="card_payment"),
    _form("received_payment_for", "credit",
          r"received\s+payment\s+(?:against|towards|for)\s+[^.\n]{0,60}?\bfor\s+{AMT}",
          scan=False, kind="card_payment"),
    _form("card_payment_successful", "credit",
          r"payment\s+of\s+{AMT}\s+(?:for|towards)\s+(?:your\s+)?[^.\n]{0,60}?credit\s+card\s+"
          r"(?:was|is|has\s+been)\s+(?:successful|(?:successfully\s+)?processed)",
          scan=False, kind="card_payment"),
    _form("repayment_received", "credit",
          r"repayment\s+of\s+{AMT}\s+(?:has\s+been\s+)?received", scan=False, kind="card_payment"),
    _form("card_bill_paid", "credit",
          r"card\s+bill\s+of\s+{AMT}\s+has\s+been\s+(?:successfully\s+)?paid",
          scan=False, kind="card_payment"),

    # Refunds and reversals (credits).
    _form("refund_of", "credit", r"refund(?:ed)?\s+of\s+{AMT}", channel=CARD_IF_CARD, kind="refund"),
    _form("amount_refunded", "credit", r"{AMT}\s+(?:has\s+been\s+|was\s+)?refunded",
          channel=CARD_IF_CARD, kind="refund"),
    _form("reversal_of", "credit", r"reversal\s+of\s+{AMT}", channel=CARD_IF_CARD, kind="refund"),
    _form("reversed_amt", "credit", r"reversed\b.{0,80}?\bAmt\s*:?\s*{AMT}",
          channel=CARD_IF_CARD, kind="refund"),
    _form("amount_reversed", "credit", r"{AMT}\s+(?:has\s+been\s+|was\s+|is\s+)?reversed",
          channel=CARD_IF_CARD, kind="refund"),

    _form("interest_credited", "credit",
          r"interest\s+(?:of\s+)?{AMT}\s+.{0,60}?credited", channel="other"),
    _form("mandate_executed", "debit",
          r"mandate\s+(?:of|for)\s+{AMT}\s+[^.\n]{0,80}?(?<!not\s)(?<!be\s)"
          r"(?:redeemed|executed|debited|paid|processed)", channel="mandate"),

    # Cash withdrawals.
    _form("atm_withdrawal", "debit", r"(?:ATM|cash)\s+withdrawal\s+of\s+{AMT}", channel="atm"),
    _form("amount_withdrawn", "debit", r"{AMT}\s+(?:has\s+been\s+|was\s+|is\s+)?withdrawn"),
    _form("withdrawn_amount", "debit", r"withdrawn\s+{AMT}"),

    # Card spends (debits, including credit-card spends).
    _form("spent_amount", "debit", r"\bspent\s+{AMT}", channel="card"),
    _form("amount_spent", "debit", r"{AMT}\s+(?:is\s+|was\s+|has\s+been\s+)?spent\b", channel="card"),
    _form("card_used_for", "debit", r"\bused\s+at\s+[^\n]{1,80}?\s+for\s+{AMT}", channel="card"),
    _form("txn_on_card", "debit", r"\bTxn\s+{AMT}\s+on\s+[^\n]{0,40}?\bcard\b", channel="card"),
    _form("card_txn_done_at", "debit",
          r"\bfor\s+{AMT}\s+by\s+[^\n]{0,40}?\bcard\b[^\n]{0,40}?\bdone\s+at\b", channel="card"),
    _form("bill_cleared_with_card", "debit",
          r"\bbill\s+of\s+{AMT}\s+at\s+.{1,80}?\s+(?:has\s+been\s+)?(?:cleared|paid)\s+"
          r"(?:with|using|on|via)\s+your\b", channel="card"),
    _form("card_debited_for_bill", "debit",
          r"\bdebited\s+your\s+[^\n]{0,60}?card\b[^\n]{0,80}?\bfor\s+the\s+amount\s+(?:of\s+)?{AMT}",
          channel="card"),
    _form("amount_paid_from_card", "debit", r"{AMT}\s+paid\s+from\s+your\s+[^\n]{0,50}?\bcard\b",
          channel="card"),

    # "sent/transferred to you(r account)" is money coming in.
    _form("sent_to_you", "credit",
          r"{AMT}\s+(?:has\s+been\s+)?(?:sent|transferred|paid)\s+to\s+(?:you\b|your\s+(?:\w+\s+)?"
          r"(?:bank\s+)?(?:a/c|account|wallet)\b)"),
    _form("sent_you", "credit", r"\bsent\s+you\s+{AMT}"),

    # More card spends.
    _form("purchase_of", "debit", r"\bpurchase\s+of\s+{AMT}", channel=CARD_IF_CARD),
    _form("card_used_for_amount", "debit",
          r"\bcard\b[^\n]{0,30}?\bused\s+for\s+(?:a\s+)?(?:txn\s+|transaction\s+|purchase\s+)?(?:of\s+)?{AMT}",
          channel="card"),
    _form("txn_of_at", "debit", r"\b(?:txn|transaction)\s+of\s+{AMT}\s+(?:at|on)\s", channel=CARD_IF_CARD),

    # Outward transfers and generic debits.
    _form("payment_from_account", "debit", r"\bpayment\s+of\s+{AMT}\s+from\s+(?:your\s+)?a/c"),
    _form("payment_to_payee", "debit", r"\bpayment\s+of\s+{AMT}\s+(?:to|towards)\s+(?!your\b)(?![^.\n]{0,40}\bcard\b)"),
    _form("amount_debited", "debit",
          r"{AMT}\s+(?:has\s+been\s+|is\s+|was\s+)?(?:debited|sent|transferred|deducted|paid|charged|Dr\.)"),
    _form("debited_amount", "debit",
          r"(?:\bdebited|\bsent|\btransferred|\bdeducted|(?<!been\s)\bpaid|\bcharged|\bDr\.)!?"
          r"\s*(?:with|by|for|of)?"
          r"\s*[:;,]?\s*{AMT_OPT}"),
    _form("amount_from_your_account", "debit",
          r"{AMT}\s+from\s+your\s+(?:[\w&]+\s+){0,3}a/c\b"),

    # "has a debit by transfer of Rs 500.00", "credit of INR 100".
    _form("debit_of", "debit", r"\bdebit\s+(?:by\s+\w+\s+)?of\s+{AMT}"),
    _form("credit_of", "credit", r"\bcredit\s+(?:by\s+\w+\s+)?of\s+{AMT}"),

    # Generic credits.
    _form("amount_credited", "credit",
          r"{AMT}\s+(?:has\s+been\s+|is\s+|was\s+)?(?:credited|deposited|received|added)\b"),
    _form("credited_amount", "credit",
          r"(?:\bcredited|\bdeposited|\breceived|\badded)!?\s*(?:with|by|for|of)?\s*[:;,]?\s*{AMT_OPT}"),

    # Loosest: the amount and its verb a few words apart in one clause
    # ("Rs 5,000 through e-mandate has been debited").
    _form("amount_then_debited", "debit",
          r"{AMT}[^.;\n]{1,40}?\b(?:has\s+been|is|was)\s+(?:debited|deducted|paid)\b", kind="loose"),
    _form("amount_then_credited", "credit",
          r"{AMT}[^.;\n]{1,40}?\b(?:has\s+been|is|was)\s+(?:credited|deposited|received)\b",
          kind="loose"),
)

# ---------------------------------------------------------------------------
# Kinds that carry no transaction
# ---------------------------------------------------------------------------

_OTP_RES = tuple(re.compile(p, _I) for p in (
    r"(?<![\d,.])\d{4,8}(?![\d,])\s+is\s+(?:your|the)\s+(?:\w+\s+){0,3}"
    r"(?:OTP|one[- ]time\s+password|verification\s+code|passcode|security\s+code)",
    r"\b(?:OTP|one[- ]time\s+password|verification\s+code|passcode)\b(?:[^.\n]|(?<=\d)\.(?=\d)){0,120}?"
    r"\b(?:is|:)\s*(?<![\d,.])\d{4,8}(?![\d,])",
    r"\b(?:use|enter)\s+(?:the\s+)?(?:OTP|code)\s*[:\-]?\s*\d{4,8}\b",
))

_OTP_FOR_RE = re.compile(r"\b(?:OTP|one[- ]time\s+password)\s+(?:for|to)\b", _I)

#: Marketing wording.  A movement form still wins over these (a cashback
#: really credited is a transaction), but they make a transaction uncertain.
_PROMO_RE = re.compile(
    r"\b(?:pre-?approved|offers?|cashback\s+(?:of\s+)?up\s*to|up\s*to\s+\d+\s*%|\d+\s*%\s+off|"
    r"flat\s+(?:rs\.?\s*|₹|inr\s*)?\d+\s*(?:off|cashback)|T\s*&\s*C|apply\s+now|"
    r"limited\s+(?:period|time)|hurry|exclusive|discount|avail\s+(?:now|it|this|the)|"
    r"click\s+(?:here|now)|win\b|vouchers?|congratulations|eligible\s+for|lowest|"
    r"instant\s+loan|personal\s+loan|loan\s+of\s+up\s*to|get\s+(?:a\s+)?(?:loan|credit\s+card)|"
    r"get\s+(?:rs\.?|₹|inr|flat|up\s*to)|cashback|reward\s+points?\s+worth)",
    _I)
#: Promotion wording strong enough to call an SMS a promotion for certain.
_STRONG_PROMO_RE = re.compile(
    r"\b(?:pre-?approved|T\s*&\s*C|apply\s+now|limited\s+(?:period|time)|hurry|"
    r"offer\s+valid|avail\s+(?:now|the\s+offer)|click\s+(?:here|now)\s+to\s+(?:apply|avail|know))",
    _I)

_MOVEMENT_WORD_RE = re.compile(
    r"\b(?:debited|credited|spent|paid|received|sent|withdrawn|refund(?:ed)?|reversed|transferred|"
    r"deposited|deducted|charged)\b", _I)
_REFUND_WORD_RE = re.compile(r"\brefund|\brevers", _I)

_DECLINE_RE = re.compile(
    r"\b(?:declined|failed|unsuccessful|rejected|could\s+not\s+be\s+(?:processed|completed)|"
    r"insufficient\s+(?:funds|balance|bal))\b", _I)

#: Money set aside rather than moved: IPO/ASBA blocks, liens, holds.
_NO_MOVEMENT_RE = re.compile(
    r"\bASBA\b|\bIPO\b.{0,80}\b(?:un)?blocked\b|\b(?:un)?blocked\b.{0,80}\bIPO\b|\blien\b|"
    r"\bon\s+hold\b", _I | re.S)

_BILL_RE = re.compile(
    r"\b(?:is\s+due|due\s+(?:on|by|date)|payment\s+due|min(?:imum)?\.?\s+(?:amount\s+)?due|"
    r"total\s+(?:amount\s+)?due|overdue)\b|"
    r"\bstatement\b.{0,60}?\b(?:generated|is\s+ready|has\s+been\s+sent)\b|"
    r"\bbill\b.{0,60}?\bis\s+(?:ready|generated|due)\b", _I)

#: Wording that makes a matched form doubtful enough to ask the LLM.
_DOUBT_RE = re.compile(
    r"\bwill\s+be\b|\bto\s+be\s+(?:debited|credited)|\bbeneficiary\b|\brequest(?:ed)?\b|"
    r"\bscheduled\b|\bupcoming\b|\bpending\b|\bremind|\bblocked\b|\bhold\b|\blien\b|"
    r"\bmandate\s+(?:created|registered|set\s+up)|\bauthori[sz]ed?\b|\bif\s+(?:you|not)\s+paid|"
    r"\bis\s+due\b|\bdue\s+(?:on|by|date)\b", _I)
#: Wording that leaves a "certain" answer open to doubt even when a form reads
#: cleanly: an OTP (an authorisation, not a movement), a movement announced or
#: under way, a returned cheque, a mandate notice, the customer's money
#: arriving at someone else ("credited to the beneficiary ... at other bank"),
#: and receipts for things that are not the account (policies, units, shares,
#: points, bonuses).  Abstaining here costs a paid call, never a wrong row.
_UNCERTAIN_RE = re.compile(
    r"\bOTP\b|\bone[-\s]?time\s+password\b|\bverification\s+code\b|"
    r"\bunder\s+process|\bprocessing\b|\bin\s+process\b|\bshortly\b|\bsoon\b|"
    r"\bunable\b|\bnot\s+(?:confirm|processed|completed)|"
    r"\bcheque\b.{0,60}\b(?:return|bounce|dishono)|\b(?:returned|bounced|dishono(?:u)?red)\b|"
    r"\bunpaid\b|\b(?:e-?)?mandate\b|\bNACH\b|\bUMRN?\b|\bstanding\s+instruction|"
    r"\bbeneficiary\b|\bother\s+bank\b|\bpayee\s+(?:a/?c|account)\b|"
    r"\bpolicy\b|\bpremium\b|\bclaim\b|\breceipt\b|\bunits?\b|\bshares\s+of\b|\bNAV\b|\bPRAN\b|"
    r"\b(?:reward\s+)?points?\s+(?:credited|added)|\bpoints?\s+credited|\bbonus\b|\bcoupon\b|\bcode\s*:", _I | re.S)
#: A safety footer ("Never share PIN/OTP") is not an OTP: removed before _UNCERTAIN_RE.
_SHARE_WARNING_RE = re.compile(r"\b(?:never|do\s+not|don'?t|not\s+to)\s+share\b[^.\n]{0,40}", _I)

# ---------------------------------------------------------------------------
# Field extractors
# ---------------------------------------------------------------------------

#: A masked account/card number as banks write it: XX1234, *1234, x123,
#: 000***000000, 4xxx0000, or bare digits.
_MASK = r"(?:(?:[Xx*]|\.(?=[.\d]))+\d{2,}|\d+[Xx*]+\d+|\d{3,})(?![\w*])"
_CARD_MASK = r"(?:[Xx*]+\d{3,}|\d+[Xx*]+\d+|\d{4})(?![\w*])"

_ACCOUNT_RES = (
    re.compile(r"(?<![\w/])(?:a/c|acct|acc|account|ac)(?:\.(?!\.))?(?:\s*(?:no\.?|number|ending(?:\s+with)?))?"
               rf"\s*(?:[:\-]|\.(?!\.))?\s*(?P<m>{_MASK})", _I),
    # "Sent Rs.9.00 from XX0000 to ..." names the account by its mask alone.
    re.compile(r"\bfrom\s+(?P<m>[Xx*]+\d{3,})(?![\w*])", _I),
)

_CARD_RE = re.compile(
    r"(?<!BLOCK\s)(?:card|\bCC)(?:\s+(?:no\.?|number|ending|in|with|account|a/c))*\s*[:.\-]?\s*"
    rf"(?P<m>{_CARD_MASK})", _I)

#: A token that looks like a reference: letters/digits with at least one digit.
_REFTOK = r"(?=[A-Z0-9]*\d)[A-Z0-9]{6,}"
_REF_RES = tuple(re.compile(p, _I) for p in (
    r"UPI/P2[AMP]/(?P<r>\d{6,})/",
    rf"(?:NEFT|RTGS|IMPS)\s*[-/]\s*(?P<r>(?=[A-Z0-9]*\d)[A-Z0-9]{{8,}})\s*[-/]",
    r"\*(?:INFT|NEFT|RTGS|IMPS)\*(?P<r>(?=[A-Z0-9]*\d)[A-Z0-9]{8,})\*",
    r"Info\s*(?:RTGS|NEFT|IMPS)\*(?P<r>(?=[A-Z0-9]*\d)[A-Z0-9]{8,})",
    r"NEFT\s+Cr-[A-Z0-9]{8,}-.{1,160}-(?P<r>(?=[A-Z0-9]*\d)[A-Z0-9]{10,})\.",
    r"\bfor\s+IMPS\s*-[^\n]{0,80}?-\s*(?P<r>\d{6,})",
    r"\bRRN\s*(?:no\.?)?\s*[:.\-]?\s*(?P<r>\d{6,})",
    rf"\bUTR\s*(?:no\.?|number)?\s*[:.\-]?\s*(?P<r>{_REFTOK})",
    rf"\bref(?:erence)?\.?\s*(?:no\.?|number|id|#)?\s*[:.#\-]?\s*(?P<r>{_REFTOK})",
    rf"\b(?:txn|transaction)\s+(?:no|number|id)\.?\s*[:.#]?\s*(?P<r>{_REFTOK})",
    r"\bUPI\s*:?\s*(?P<r>\d{9,})\b",
    r"\bIMPS\s*:\s*(?P<r>\d{9,})\b",
    # "UPI CC-27-04-2026-<12-digit RRN>": the RRN ends the narration.
    r"\bUPI\s+\S*?-(?P<r>\d{12})\b",
))

_BALANCE_RE = re.compile(
    r"(?:\bavl\.?\s*bal(?:ance)?\.?|\bavlbal|\bavailable\s+bal(?:ance)?|\bnew\s+bal(?:ance)?|"
    r"(?<!view\s)\bbal(?:ance)?\b\.?|\bavl\.?\s*(?:credit\s+)?(?:limit|lmt)|\bavbl\.?\s*limit|"
    r"\bavailable\s+(?:credit\s+)?limit|(?<!txn\s)(?<!due\s)\blimit\b)"
    rf"\s*(?:is\b)?\s*[:\-]?\s*{AMT_OPT}", _I)

#: A balance stated with some words in between ("balance in your A/c XX1 is Rs 5").
_BALANCE_KIND_RE = re.compile(rf"\bbal(?:ance)?\b[^\n]{{0,60}}?{AMT}", _I)

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_MON = r"(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"

_ISO_DT_RE = re.compile(
    r"(?<!\d)\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?(?!\d)")
_DATE_RES = tuple(re.compile(p, _I) for p in (
    r"(?<!\d)(?P<y>\d{4})[-/:](?P<m>\d{1,2})[-/:](?P<d>\d{1,2})(?!\d)",
    r"(?<!\d)(?P<d>\d{1,2})[-/.](?P<m>\d{1,2})[-/.](?P<y>\d{4}|\d{2})(?!\d)",
    rf"(?<!\d)(?P<d>\d{{1,2}})[-/ ]?{_MON}[-/ ,]*(?P<y>\d{{4}}|\d{{2}})(?!\d)",
    rf"(?<![A-Za-z]){_MON}\s+(?P<d>\d{{1,2}}),?\s+(?P<y>\d{{4}})(?!\d)",
))
_TIME_RE = re.compile(
    r"(?:\s*,\s*|\s+|:|_|\s+at\s+)(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2}))?(?!\d)"
    r"(?:\s*(?P<ap>[ap])\.?m\b\.?)?", _I)
#: A date right after "on"/"date"/"dated" is the transaction's own date.
_DATE_LEAD_RE = re.compile(r"(?:\bon|\bdated?)\s*:?\s*$", _I)

# ---------------------------------------------------------------------------
# Counterparty
# ---------------------------------------------------------------------------

#: A UPI handle (user@bank); not an e-mail address (no ".com" after it).
_VPA = r"(?<![\w.\-])[\w.\-]+@[A-Za-z][A-Za-z0-9]*(?![\w@]|\.[A-Za-z])"
#: Words after "to"/"from"/"by" that do not start a payee's name.
_STOP = (r"(?:your|you|the|a/c|acct|account|an?\b|report|dispute|block|raise|pay\b|view|know|"
         r"avoid|register|ur\b|SMS|mobile|beneficiary|VPA|card|UPI|IMPS|NEFT|RTGS|BRANCH|"
         r"Mob\b|cash|cheque|self\b|call|us\b|customer\s+care)")


@dataclass(frozen=True)
class Party:
    """One counterparty form; ``fmt`` builds the value from the groups."""

    pattern: re.Pattern
    direction: str | None = None
    fmt: str = "{cp}"


def _party(pattern: str, direction: str | None = None, fmt: str = "{cp}", flags: int = _I) -> Party:
    return Party(re.compile(pattern, flags), direction, fmt)


#: Ordered: structured narrations, then account/mobile/VPA payees, then
#: merchants, then names after "to"/"from"/"by".
PARTIES: tuple[Party, ...] = (
    _party(r"UPI/P2[AMP]/\d+/(?P<cp>[^/\n]{1,80}?)(?=/|\s+Not\s+you|\s+-\s|\.\s|\n|$)"),
    _party(r"NEFT\s+Cr-[A-Z0-9]{8,}-(?P<cp>.{1,80})-[^-\n]{1,80}-[A-Z0-9]{10,}\."),
    _party(r"\bfor\s+IMPS\s*-\s*(?P<cp>[^-\n]{1,80}?)\s*-\s*\d{6,}"),
    _party(r"\bfor\s+FT\s*-\s*(?P<cp>[^\n]{1,80}?)\s*\.(?=\S|\s*$)"),
    _party(rf"\bInfo:?\s*(?:NEFT|RTGS|IMPS)\s*[-/]\s*{_REFTOK}\s*[-/]\s*"
           r"(?P<cp>[^/.\n]*[A-Za-z][^/.\n]{0,80}?)\s*\."),
    _party(r"\bInfo:?\s*(?P<cp>\S[^\n]{0,80}?)\.(?=\s*(?:Avl|Available|New\s+bal)|\s*$)"),
    _party(r"\bbeneficiary\s+(?P<cp>[^\n]{1,80}?)\s+has\s+received\b"),
    _party(r"\bmandate\s+(?:of|for)\s+[^\n]{1,30}?\s+raised\s+by\s+(?P<cp>[^\n]{1,80}?)\s+on\b"),
    _party(rf"\btransferred\s+to\s+your\s+(?P<what>[\w/ ]{{1,80}}?)\s+A/c\s*(?:No\.?)?\s*(?P<m>{_MASK})",
           "debit", fmt="{what} A/c {m}"),
    _party(r"\bto\s+pay\s+your\s+(?P<cp>[^\n]{1,80}?)\s+bill\b"),
    _party(rf"\blinked\s+to\s+VPA\s+(?P<cp>{_VPA})"),
    _party(r"\blinked\s+to\s+mobile(?:\s+(?:number|no\.?))?\s+[\dXx*]+-(?P<cp>[^(\n]{1,80}?)\s*(?:\(|$)"),
    _party(r"\blinked\s+to\s+mobile(?:\s+(?:number|no\.?))?\s+(?P<mob>[\dXx*]{3,})",
           fmt="Mobile {mob}"),
    _party(r"(?:&|\band)\s+(?:a/c|acct|account)(?:\s+ending)?\s+(?P<m>[Xx*\d]{3,}(?:/[^\s.]+)?)\s+"
           r"(?:will\s+be\s+)?credited", fmt="Acct {m}"),
    _party(rf"\bto\s+(?:a/c|acct|account)\s*(?:no\.?)?\s*(?P<m>{_MASK})", "debit", fmt="Acct {m}"),
    _party(r";\s*(?P<cp>[^;\n]{1,80}?)\s+credited\b", "debit"),
    _party(r"\bFvg:?\s*(?P<cp>[^\n]{1,80}?)(?=\s+Avl\b|\s*$)"),
    _party(rf"(?:\bVPA|\bCr\.\s*to|\bfrom|\bto|\btowards|\bat|\bby)\s+(?P<cp>{_VPA})"),
    # Merchants.
    _party(r"\bat\s+(?P<cp>(?:(?!\b(?:has|was|is|on)\b)[^\n]){1,80}?)\s+with\s+your\b"),
    _party(r"\bat\s+(?![+\d]|https?:|www\.|\S*@)(?!" + _STOP + r")(?P<cp>[^\n]{1,80}?)"
           r"(?=\s+(?:on|for|was|has|by|via|using)\b|\.\s|\.$|\s*\(|\n|$)"),
    _party(r"(?:IST|\d{1,2}:\d{2}(?::\d{2})?)\s*\n(?P<cp>[A-Za-z][^\n]*)\n\s*(?:Avl|Available)"),
    _party(r"\bon\s+\d{1,2}[-/ ]?[A-Za-z]{3}[-/ ]?\d{2,4}\s+on\s+(?P<cp>[^\n]{1,80}?)(?=\.\s|\.$|$)"),
    _party(r"^(?!Dear\b)(?P<cp>[A-Z][^,\n]{0,80}?)\s+refund\s+of\b"),
    _party(r"\brefunded\s+by\s+(?!" + _STOP + r")(?P<cp>[^\n]{1,80}?)\s+on\b"),
    _party(r"\bby\s+(?!" + _STOP + r")(?!rs\b|inr\b)(?P<cp>[A-Za-z][^\s]*)\s+on\s+\d"),
    _party(r"\bfor\s+(?!NEFT|RTGS|IMPS|UPI|money\b|the\b|your\b)(?P<cp>[^\n]{1,80}?)\s+transaction\b",
           "debit"),
    _party(r"\bRef-(?P<cp>[A-Za-z][^.\n]{0,80}?)\.", "credit"),
    # People.
    _party(r"\bto\s+(?!" + _STOP + r")(?P<cp>[A-Za-z][^;\n~(]{0,80}?)"
           r"(?=\s+(?:on|from|via|using|is|has|was)\b|\s*;|\s*\(|\s*\n|\s*~|\s+(?:Ref|RRN|UPI\b)|"
           r"\.\s*(?:RRN|Ref)|"
           r"\.\s|\.$|$)", "debit"),
    _party(r"\bfrom\s+(?!" + _STOP + r")(?P<cp>[A-Za-z][^;\n(]{0,80}?)"
           r"(?=\s+on\b|\s+in\s+your\b|\s+via\b|\s+has\s+been\b|\s*;|\s*\(|\s*\n|"
           r"\s+(?:Ref|RRN|UPI\b)|\.\s|\.(?=[A-Z])|\.$|$)", "credit"),
    _party(r"\bcredited\b[^\n]{0,80}?\bby\s+(?!" + _STOP + r")(?P<cp>[A-Za-z][^.\n]{0,80}?)\.\s*(?:RRN|Ref)",
           "credit"),
)

#: Bank narration codes that name a counterparty of the bank's own.
_NARRATIONS = ((re.compile(r"^TRF\s+TO\s+FD\b", _I), "{BANK} FD"),)

# ---------------------------------------------------------------------------
# Channel
# ---------------------------------------------------------------------------

#: "by/via/thru UPI ..." names the payment method outright.
_METHOD_RE = re.compile(r"\b(?:by|via|thru|through|using)\s+(UPI|IMPS|NEFT|RTGS)\b", _I)
#: Keywords, in order of precedence, when the form has no channel of its own.
_CHANNEL_KEYWORDS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (name, re.compile(p, _I)) for name, p in (
        ("mandate", r"\b(?:e-?mandate|mandate|NACH|auto-?debit|standing\s+instruction)\b"),
        ("upi", rf"\bUPI\b|\bVPA\b|{_VPA}"),
        ("imps", r"(?:\b|(?<=Info))IMPS\b|\*INFT\*"),  # ICICI's INFT narration is labelled IMPS
        ("neft", r"(?:\b|(?<=Info))NEFT\b"),
        ("rtgs", r"(?:\b|(?<=Info))RTGS\b"),
        ("atm", r"\bATM\b(?!\s*card)|\bcash\s+withdrawal\b"),
        ("wallet", r"\bwallet\b|\b(?:Paytm|Amazon\s*Pay|PhonePe|MobiKwik)\s+balance\b"),
        ("netbanking", r"\bnet\s*banking\b|\bonline\s+banking\b|\binternet\s+banking\b"),
        ("other", r"\binterest\b|\bBRANCH\b|\bcash\s+deposit\b"),
        ("card", r"\b(?:debit|credit)\s+card\s+(?:purchase|txn|transaction)\b|\bPOS\b"),
    ))

# ---------------------------------------------------------------------------
# Bank
# ---------------------------------------------------------------------------

#: (slug, pattern), ordered so that a brand wins over the bank behind it
#: when both match at the same place (BOBCARD One → onecard, Edge CSB → jupiter).
BANKS: tuple[tuple[str, re.Pattern], ...] = tuple((slug, re.compile(p, _I)) for slug, p in (
    ("onecard", r"\bOne\s?Card\b|BOBCARD\s+One\b|\bOneCrd\b|\b1crd\.in"),
    ("jupiter", r"\bJupiter\b|\bEdge\s+CSB\b"),
    ("slice", r"\bslice\b"),
    ("revolut", r"\bRevolut\b"),
    ("paytm", r"\bPaytm\b"),
    ("phonepe", r"\bPhonePe\b"),
    ("amazon_pay", r"\bAmazon\s?Pay\b"),
    ("mobikwik", r"\bMobiKwik\b"),
    ("airtel", r"\bAirtel\s+Payments?\s+Bank\b"),
    ("hdfc", r"\bHDFC\s?Bank\b|\bHDFC\b"),
    ("icici", r"\bICICI\b"),
    ("axis", r"\bAxis\s?Bank\b|\bAxis\b"),
    ("sbi", r"\bSBI\b|\bState\s+Bank\s+of\s+India\b|\bsbicard\b"),
    ("kotak", r"\bKotak"),
    ("idfc", r"\bIDFC\b"),
    ("indusind", r"\bIndusInd\b"),
    ("bob", r"\bBOBCARD\b|\bBOB\b|\bBank\s+of\s+Baroda\b"),
    ("canara", r"\bCanara\s?Bank\b|\bCanara\b"),
    ("union", r"\bUnion\s?Bank\b"),
    ("indian_bank", r"\bIndian\s?Bank\b"),
    ("boi", r"(?<!Union\s)(?<!State\s)(?<!Central\s)\bBank\s+of\s+India\b"),
    ("pnb", r"\bPNB\b|\bPunjab\s+National\s+Bank\b"),
    ("yes", r"\bYes\s?Bank\b"),
    ("federal", r"\bFederal\s+Bank\b"),
    ("rbl", r"\bRBL\b"),
    ("au", r"\bAU\s+(?:Small\s+Finance\s+)?Bank\b"),
    ("equitas", r"\bEquitas\b"),
    ("hsbc", r"\bHSBC\b"),
    ("sc", r"\bStandard\s+Chartered\b|\bStanChart\b"),
    ("citi", r"\bCiti(?:bank)?\b"),
    ("dbs", r"\bDBS\b|\bdigibank\b"),
    ("idbi", r"\bIDBI\b"),
    ("iob", r"\bIndian\s+Overseas\s+Bank\b|\bIOB\b"),
    ("uco", r"\bUCO\s+Bank\b"),
    ("central_bank", r"\bCentral\s+Bank\s+of\s+India\b"),
    ("bank_of_maharashtra", r"\bBank\s+of\s+Maharashtra\b"),
    ("south_indian", r"\bSouth\s+Indian\s+Bank\b"),
    ("karnataka", r"\bKarnataka\s+Bank\b"),
    ("bandhan", r"\bBandhan\b"),
    ("csb", r"\bCSB\s+Bank\b"),
    ("amex", r"\bAmerican\s+Express\b|\bAmex\b"),
))

#: Sender-ID codes (the part after "AX-", "VM-", ...), matched as prefixes.
SENDER_CODES: tuple[tuple[str, str], ...] = (
    ("ONECRD", "onecard"), ("ONECARD", "onecard"), ("JUPITR", "jupiter"), ("JUPITER", "jupiter"),
    ("SLICE", "slice"), ("SLCEIT", "slice"), ("REVOLT", "revolut"), ("PAYTM", "paytm"),
    ("PHONPE", "phonepe"), ("AMAZON", "amazon_pay"), ("AMZPAY", "amazon_pay"),
    ("MOBIKW", "mobikwik"), ("HDFC", "hdfc"), ("ICICI", "icici"), ("AXIS", "axis"),
    ("SBI", "sbi"), ("CBSSBI", "sbi"), ("ATMSBI", "sbi"), ("KOTAK", "kotak"), ("KMBL", "kotak"),
    ("IDFC", "idfc"), ("INDUS", "indusind"), ("BOBCRD", "bob"), ("BOB", "bob"),
    ("CANBNK", "canara"), ("CANARA", "canara"), ("UNIONB", "union"), ("INDBNK", "indian_bank"),
    ("PNB", "pnb"), ("YESBNK", "yes"), ("FEDBNK", "federal"), ("RBL", "rbl"), ("AUBANK", "au"),
    ("EQUTAS", "equitas"), ("EQUITAS", "equitas"), ("HSBC", "hsbc"), ("SCBANK", "sc"),
    ("CITI", "citi"), ("DBS", "dbs"), ("IDBI", "idbi"), ("IOB", "iob"), ("UCO", "uco"),
    ("BOIIND", "boi"),
)
