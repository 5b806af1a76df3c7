"""HTML email -> HTML safe to show in our pages, via nh3 (ammonia) with an email allow-list.

All URL decisions (remote images, cid: rewriting, link schemes) happen inside nh3's
attribute_filter, i.e. during sanitizing: its output is never edited afterwards. nh3's own URL
checks run first, then our filter, whose return value nh3 does not re-check, so the filter is
the authority for every URL-bearing attribute we allow.
"""
from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass
from urllib.parse import unquote

import nh3

from mailsync.mime.charsets import scrub

_HEADINGS = {f"h{i}" for i in range(1, 7)}
ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "acronym", "address", "article", "b", "bdi", "bdo", "big", "blockquote",
        "br", "caption", "center", "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div",
        "dl", "dt", "em", "figcaption", "figure", "font", "footer", "header", "hr", "i", "img",
        "ins", "kbd", "li", "main", "mark", "ol", "p", "pre", "q", "s", "samp", "section",
        "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th",
        "thead", "tr", "tt", "u", "ul", "var", "wbr",
    }
    | _HEADINGS
)
# Removed together with their content. Everything else not allowed (form, input, base, meta,
# link, area, map...) loses the tag but keeps its text.
REMOVED_WITH_CONTENT = frozenset(
    {
        "script", "style", "title", "head", "noscript", "template", "iframe", "frame",
        "frameset", "noframes", "object", "embed", "applet", "svg", "math", "textarea",
        "select", "option", "button", "xmp", "noembed", "audio", "video", "canvas",
    }
)
_TABLE_ATTRS = {"width", "height", "border", "cellpadding", "cellspacing", "bgcolor",
                "background", "summary", "align", "valign", "nowrap", "colspan", "rowspan",
                "scope", "span"}
ALLOWED_ATTRIBUTES: dict[str, set[str]] = {
    # No id/class/name: they would let mail clobber our DOM or borrow our page's CSS.
    "*": {"align", "valign", "dir", "lang", "title", "style"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height", "border", "hspace", "vspace"},
    "font": {"color", "face", "size"},
    "table": _TABLE_ATTRS,
    "td": _TABLE_ATTRS,
    "th": _TABLE_ATTRS,
    "tr": {"bgcolor", "height", "background"},
    "tbody": {"bgcolor"},
    "thead": {"bgcolor"},
    "tfoot": {"bgcolor"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type", "reversed"},
    "ul": {"type"},
    "li": {"value", "type"},
    "hr": {"width", "size", "noshade", "color"},
    "del": {"datetime"},
    "ins": {"datetime"},
}
# Layout and typography only: no position/z-index (overlays that fake our UI), no cursor,
# content, behavior, -moz-binding, filter or list-style-image (scripts or URLs).
ALLOWED_STYLE_PROPERTIES = frozenset(
    {
        "background", "background-color", "background-image", "color", "font", "font-family",
        "font-size", "font-style", "font-variant", "font-weight", "letter-spacing",
        "line-height", "text-align", "text-decoration", "text-indent", "text-transform",
        "vertical-align", "white-space", "word-spacing", "word-break", "word-wrap",
        "overflow-wrap", "direction", "display", "width", "height", "max-width", "min-width",
        "max-height", "min-height", "margin", "margin-top", "margin-right", "margin-bottom",
        "margin-left", "padding", "padding-top", "padding-right", "padding-bottom",
        "padding-left", "border", "border-top", "border-right", "border-bottom", "border-left",
        "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
        "border-radius", "list-style-type", "table-layout", "text-overflow", "overflow",
    }
)
_LINK_SCHEMES = ("http", "https", "mailto")
_BACKGROUND_ATTR = "background"
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_STRIP_CHARS = "".join(chr(c) for c in range(0x21))  # WHATWG URL: leading/trailing C0 + space
_INLINE_IMAGE_RE = re.compile(
    r"^data:image/(?:png|jpeg|jpg|gif)(?:;[a-z0-9=._-]+)*;base64,[a-z0-9+/=\s]*$", re.I
)
_CSS_URL_RE = re.compile(r"url\(\s*(['\"]?)([^'\"()\s]*)\1\s*\)", re.I)
_CSS_DANGER_RE = re.compile(r"\\|/\*|expression|@import|image-set|-moz-binding|behavior", re.I)


# html5ever (under nh3) is quadratic in the depth of open elements: 100,000 nested <div>s take
# ~17 s, as do unmatched end tags under deep nesting. Browsers cap the depth too (Blink's
# parser stops nesting at 512), so tags beyond that depth are removed before parsing.
MAX_NESTING = 512
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "image", "input",
                        "keygen", "link", "meta", "param", "source", "track", "wbr"})
# Closed implicitly by their next sibling (HTML "optional end tags"), so they never pile up.
_IMPLIED_END_TAGS = frozenset({"p", "li", "dt", "dd", "td", "th", "tr", "tbody", "thead",
                               "tfoot", "option", "optgroup", "rb", "rt", "rp", "rtc",
                               "colgroup", "caption"})
_TAG_SCAN_RE = re.compile(r"<(/?)([a-zA-Z][^\s/<>]*)[^<>]*>?")


def limit_nesting(html: str, limit: int = MAX_NESTING) -> str:
    """Drop start tags nested deeper than `limit` and unmatched end tags (pre-sanitizing)."""
    if html.count("<") - html.count("</") <= limit:
        return html  # fewer start tags than the limit: nothing can be that deep
    stack: list[str] = []
    open_count: dict[str, int] = {}
    pieces: list[str] = []
    last = 0
    for m in _TAG_SCAN_RE.finditer(html):
        name = m.group(2).lower()
        if name in _VOID_TAGS or name in _IMPLIED_END_TAGS:
            continue
        if m.group(1):
            if open_count.get(name):
                while stack:  # an end tag closes everything opened after its start tag
                    top = stack.pop()
                    open_count[top] -= 1
                    if top == name:
                        break
                continue
            # An unmatched end tag is ignored by HTML parsing anyway; drop it.
        elif len(stack) < limit:
            stack.append(name)
            open_count[name] = open_count.get(name, 0) + 1
            continue
        pieces.append(html[last:m.start()])
        last = m.end()
    if not pieces:
        return html
    pieces.append(html[last:])
    return "".join(pieces)


@dataclass(frozen=True)
class SanitizedHtml:
    """Sanitized HTML and how many remote resources were held back."""

    html: str
    blocked_remote_images: int  # remote <img>, CSS url() and background= URLs removed


_CSS_OTHER_URL_RE = re.compile(r"(?:image|image-set|-webkit-image-set|src|cross-fade|element)\s*\(", re.I)


def _normalize_url(value: str) -> str:
    # WHATWG URL parsing drops leading/trailing C0 controls and spaces and every tab/CR/LF, so
    # "java\tscript:" is javascript:; check what the browser will see.
    return re.sub(r"[\t\r\n]", "", value.strip(_STRIP_CHARS))


def _scheme(url: str) -> str:
    """The URL's scheme in lower case; '//' for network-path (protocol-relative) URLs."""
    m = _SCHEME_RE.match(url)
    if m:
        return m.group(1).lower()
    # Browsers treat "\" as "/" in http(s) URLs, so "/\host" and "\\host" are network paths too.
    if len(url) >= 2 and url[0] in "/\\" and url[1] in "/\\":
        return "//"
    return ""


class _Filter:
    """nh3 attribute_filter: decides every URL and style we keep, and counts what it blocks."""

    def __init__(self, allow_remote_images: bool, cid_urls: dict[str, str] | None) -> None:
        self.allow_remote = allow_remote_images
        self.cid_urls = dict(cid_urls or {})
        self.cid_lower = {k.lower(): v for k, v in self.cid_urls.items()}
        self.blocked = 0

    def __call__(self, tag: str, attr: str, value: str) -> str | None:
        try:
            if (tag, attr) == ("a", "href"):
                url = _normalize_url(value)
                return url if _scheme(url) in _LINK_SCHEMES else None
            if (tag, attr) == ("img", "src"):
                return self.image(_normalize_url(value))
            if attr == _BACKGROUND_ATTR:
                return self.remote(_normalize_url(value))
            if attr == "style":
                return self.style(value)
            return value
        except Exception:  # the filter runs inside Rust; fail closed
            return None

    def remote(self, url: str) -> str | None:
        scheme = _scheme(url)
        if scheme in ("http", "https", "//"):
            if self.allow_remote:
                return "https://" + url[2:] if scheme == "//" else url
            self.blocked += 1
        return None

    def image(self, url: str) -> str | None:
        scheme = _scheme(url)
        if scheme == "cid":
            # RFC 2392: "cid:" + the Content-ID's addr-spec, %-encoded, without <>.
            cid = unquote(url[4:]).strip().strip("<>")
            return self.cid_urls.get(cid) or self.cid_lower.get(cid.lower())
        if scheme == "data":
            return url if _INLINE_IMAGE_RE.match(url) else None
        return self.remote(url)

    def style(self, value: str) -> str | None:
        kept: list[str] = []
        for decl in value.split(";"):
            if not decl.strip():
                continue
            if _CSS_DANGER_RE.search(decl):
                if "url(" in decl.lower():
                    self.blocked += 1
                continue
            prop = decl.split(":", 1)[0].strip().lower()
            urls = _CSS_URL_RE.findall(decl)
            if prop not in ALLOWED_STYLE_PROPERTIES or ":" not in decl:
                self.blocked += sum(1 for _, u in urls if _scheme(u) in ("http", "https", "//"))
                continue
            if "url(" not in decl.lower() and ("//" in decl or _CSS_OTHER_URL_RE.search(decl)):
                # A URL outside url(): src(), image(), image-set("..."): no remote loads.
                self.blocked += 1
                continue
            if "url(" in decl.lower():
                remote = [u for _, u in urls if _scheme(u) in ("http", "https", "//")]
                ok = (
                    self.allow_remote
                    and prop in ("background", "background-image")
                    and len(urls) == decl.lower().count("url(")
                    and len(remote) == len(urls)
                )
                if not ok:
                    self.blocked += len(remote) or int("//" in decl)
                    continue
            kept.append(decl.strip())
        return "; ".join(kept) or None


def sanitize_html(
    html: str, *, allow_remote_images: bool = False, cid_urls: dict[str, str] | None = None
) -> SanitizedHtml:
    """Sanitize email HTML for display. Remote images stay blocked unless allowed; `cid:` images
    are rewritten through `cid_urls` (Content-ID without <> -> our download URL) or dropped."""
    attr_filter = _Filter(allow_remote_images, cid_urls)
    cleaned = nh3.clean(
        limit_nesting(scrub(html or "").replace("\x00", "")),  # nh3 raises on lone surrogates
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(REMOVED_WITH_CONTENT),
        attributes={k: set(v) for k, v in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=attr_filter,
        strip_comments=True,  # also drops Outlook's conditional comments
        link_rel="noopener noreferrer",
        # Let every scheme we might keep reach the filter, which allows http(s)/mailto links,
        # cid: and small data: images only; relative URLs pass to the filter and are dropped.
        url_schemes={"http", "https", "mailto", "cid", "data"},
        url_relative="pass_through",
        filter_style_properties=set(ALLOWED_STYLE_PROPERTIES),
    )
    return SanitizedHtml(html=cleaned, blocked_remote_images=attr_filter.blocked)


_BREAK_TAGS = {"p", "div", "br", "tr", "li", "blockquote", "pre", "table", "hr", "ul", "ol",
               "dl", "dt", "dd"} | _HEADINGS
_BREAK_RE = re.compile(
    r"<br\s*/?>|<hr\s*/?>|</(?:p|div|tr|li|blockquote|pre|table|ul|ol|dl|dt|dd|h[1-6])>", re.I
)
_TAG_RE = re.compile(r"<[^>]*>")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    """Plain text from HTML for mail without a text/plain part (not for display as HTML)."""
    try:
        stripped = nh3.clean(
            limit_nesting(scrub(html)),
            tags=set(_BREAK_TAGS),
            clean_content_tags=set(REMOVED_WITH_CONTENT),
            attributes={},
            link_rel=None,
        )
    except Exception:
        stripped = html
    text = _TAG_RE.sub("", _BREAK_RE.sub("\n", stripped))
    text = html_lib.unescape(text).replace("\xa0", " ").replace("\x00", "")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()
