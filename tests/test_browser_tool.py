"""The browser tool over a folder of real documents, and its page format against OpenAI's reference tool.

The exact strings in the format tests were written by hand from gpt-oss's `gpt_oss/tools/simple_browser`:
`SimpleBrowserTool._make_response` and `show_page` (the `[cursor] title (url)` header, the
`**viewing lines [a - b] of last**` scrollbar, `L{n}: ` lines), `page_contents.process_html` (the `URL:` line,
`#` headings, `  * ` items, `【id†text】` links, `†domain` for other sites), the search pages its Exa and You.com
backends build, and `run_find_in_page` (`# 【n†match at L{line}】` and four lines).
"""

import json
import re

import pytest

from gptoss_jax.tools import (
    BrowserError,
    BrowserTool,
    ExaBackend,
    LocalBackend,
    Page,
    SearchResult,
    YouComBackend,
    browser_backends,
)
from gptoss_jax.tools.browser_pages import html_page

SOLAR = """<!doctype html>
<html><head><title>The Solar System</title><style>p { color: red }</style></head>
<body>
<h1>The Solar System</h1>
<p>The Sun is the star at the centre of the Solar System. Eight planets orbit it; the
<a href="planets.md">list of planets</a> gives their order, and
<a href="https://en.wikipedia.org/wiki/Sun">Wikipedia</a> has more.</p>
<h2>Facts</h2>
<ul><li>Age: about 4.6 billion years</li><li>Light takes 8 minutes to reach Earth</li></ul>
<script>console.log("not text")</script>
</body></html>
"""

PLANETS = """# Planets

The planets in order from [the Sun](solar.html):

1. Mercury, the smallest planet
2. Venus, the hottest planet
3. Earth, our home
4. Mars, the red planet, with two moons
5. Jupiter, the largest planet

Mars has the tallest volcano, Olympus Mons.
"""

PASTA = """Tomato pasta

Boil the pasta in salted water. Fry garlic in olive oil, add tomatoes and simmer.
Mix the pasta into the sauce and serve with basil.
"""


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "solar.html").write_text(SOLAR)
    (tmp_path / "planets.md").write_text(PLANETS)
    (tmp_path / "pasta.txt").write_text(PASTA)
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "moons.md").write_text("# Moons\n\nMars has two moons ([planet list](../planets.md)).\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "planets-copy.md").write_text(PLANETS)  # hidden: not indexed
    return tmp_path


@pytest.fixture
def browser(docs):
    return BrowserTool(LocalBackend(docs))


def lines_of(view: str) -> dict[int, str]:
    return {int(number): text for number, text in re.findall(r"^L(\d+): (.*)$", view, re.MULTILINE)}


def number(lines: dict[int, str], text: str) -> int:
    """The number of the line that reads `text` (a fetched page's first lines hold its file URL, which the
    80-character wrap splits into as many lines as the temporary folder's path needs)."""
    return next(line for line, content in lines.items() if content == text)


def test_search_ranks_the_relevant_document_first(browser, docs):
    view = browser.call("browser.search", '{"query": "which planet is red and has moons"}')
    header, scrollbar, blank, *body = view.split("\n")
    assert header == "[0] which planet is red and has moons" and blank == ""
    assert body[:2] == ["L0: # Search Results", "L1: "]
    assert body[2].startswith("L2:   * 【0†Planets】 4. Mars, the red planet, with two moons")
    assert browser.page(0).links[0] == (docs / "planets.md").as_uri()
    assert "pasta" not in view.lower() and ".cache" not in str(browser.page(0).links)
    assert scrollbar == f"**viewing lines [0 - {len(body) - 1}] of {len(body) - 1}**"

    view = browser.call("search", {"query": "pasta with tomatoes", "topn": 1})
    assert lines_of(view)[2].startswith("  * 【0†pasta.txt】") and 3 not in lines_of(view)


def test_open_by_result_id_and_by_url_with_line_windows(browser, docs):
    uri = (docs / "planets.md").as_uri()
    browser.call("search", {"query": "planets in order"})
    view = browser.call("open", {"id": 0})
    full = lines_of(view)
    top, last = number(full, "# Planets"), max(full)
    assert view.startswith(f"[1] Planets ({uri})\n**viewing lines [0 - {last}] of {last}**\n\n")
    assert full[0] == "" and "".join(full[line] for line in range(1, top)) == f"URL: {uri}"
    assert full[top + 2] == "The planets in order from 【0†the Sun】:"
    assert full[last] == "Mars has the tallest volcano, Olympus Mons."

    window = browser.call("open", json.dumps({"id": "planets.md", "loc": top + 4, "num_lines": 3}))
    assert window.split("\n")[:2] == [f"[2] Planets ({uri})", f"**viewing lines [{top + 4} - {top + 6}] of {last}**"]
    assert lines_of(window) == {line: full[line] for line in range(top + 4, top + 7)}  # citations: the same lines
    by_url = browser.call("open", {"id": uri, "loc": float(last)})
    assert lines_of(by_url) == {last: full[last]}
    scrolled = browser.call("open", {"cursor": 1, "loc": top, "num_lines": 1})  # no id: scroll cursor 1's page
    assert scrolled.startswith("[4] Planets") and lines_of(scrolled) == {top: "# Planets"}
    assert browser.page(4).url == browser.page(1).url == uri


def test_find_reports_matches_by_line_and_opens_them(browser):
    page = lines_of(browser.call("open", {"id": "planets.md"}))
    mars, volcano = number(page, "4. Mars, the red planet, with two moons"), max(page)
    assert volcano == mars + 3
    view = browser.call("find", {"pattern": "MARS"})
    url = browser.page(0).url
    assert view.split("\n")[0] == f"[1] Find results for text: `mars` in `Planets` ({url}/find?pattern=mars)"
    found = lines_of(view)  # a match shows four lines, and the search goes on after them: one match here
    assert found == {0: f"# 【0†match at L{mars}】", **{n: page[mars + n - 1] for n in range(1, 5)}}
    assert found[4] == page[volcano] == "Mars has the tallest volcano, Olympus Mons."
    opened = browser.call("open", {"id": 0})  # a find result opens the page a few lines above the match
    assert f"[2] Planets ({url})\n**viewing lines [{mars - 4} - {volcano}] of {volcano}**" in opened
    none = browser.call("find", {"pattern": "pluto", "cursor": 0})
    assert none.endswith("\n\nL0: No `find` results for pattern: `pluto`")
    link_text = lines_of(browser.call("find", {"pattern": "the sun", "cursor": 0}))  # marks are searched as text
    assert link_text[0] == f"# 【0†match at L{number(page, 'The planets in order from 【0†the Sun】:')}】"
    assert link_text[1] == "The planets in order from the Sun:"


def test_a_link_from_an_earlier_cursor_opens_the_linked_document(browser, docs):
    solar = "\n".join(lines_of(browser.call("open", {"id": "solar.html"})).values())
    assert "\n# The Solar System\n" in solar
    assert "【0†list of planets】" in solar and "【1†Wikipedia†en.wikipedia.org】" in solar
    browser.call("search", {"query": "pasta"})
    view = browser.call("open", {"id": 0, "cursor": 0})
    assert view.startswith(f"[2] Planets ({(docs / 'planets.md').as_uri()})")
    back = browser.call("open", {"id": 0})  # planets.md links back to solar.html
    assert back.startswith("[3] The Solar System")
    assert "【0†planet list】" in browser.call("open", {"id": "guides/moons.md"})
    assert browser.call("open", {"id": 0}).startswith("[5] Planets")  # ../planets.md from guides/
    assert browser.call("open", {"id": 1, "cursor": 0}) == (
        "Error fetching URL `https://en.wikipedia.org/wiki/Sun`: "
        f"this browser opens only the documents under {docs.resolve()}")


def test_every_cursor_keeps_its_own_page(browser):
    """Unlike the reference, whose search pages all share the URL "" (an old cursor shows the newest results)."""
    browser.call("search", {"query": "pasta"})
    browser.call("search", {"query": "volcano"})
    assert browser.call("open", {"id": 0, "cursor": 0}).startswith("[2] pasta.txt")
    assert browser.call("open", {"id": 0, "cursor": 1}).startswith("[3] Planets")


def test_view_source_shows_the_document_as_written(browser, docs):
    browser.call("open", {"id": "solar.html"})
    view = browser.call("open", {"view_source": True})
    assert view.startswith(f"[1] solar.html (view-source:{(docs / 'solar.html').as_uri()})")
    assert "<title>The Solar System</title>" in view


def test_page_format_matches_the_reference_exactly():
    """A small page, a search page and a find page, each as the reference tool draws it, less two things done on
    purpose: html2text's trailing spaces (after `# Sun`, `## Layers`, `  * Core`) and the search page's first two
    lines (an empty line, then `URL: ` with the empty URL every reference search page has)."""

    class Web:
        def search(self, query, topn):
            return [SearchResult("Sun - Wikipedia", "https://en.wikipedia.org/wiki/Sun", "The Sun is\n the star."),
                    SearchResult("NASA: Sun", "https://science.nasa.gov/sun/", "")][:topn]

        def fetch(self, url):
            html = ("<html><head><title>Sun</title></head><body><h1>Sun</h1><p>The Sun is a <a href='/wiki/Star'>"
                    "star</a> (see <a href='https://nasa.gov/sun'>NASA</a>).</p><h2>Layers</h2>"
                    "<ul><li>Core</li><li>Corona</li></ul></body></html>")
            return html_page(html, url)

    browser = BrowserTool(Web())
    assert browser.call("search", {"query": "sun"}) == (
        "[0] sun\n"
        "**viewing lines [0 - 3] of 3**\n\n"
        "L0: # Search Results\n"
        "L1: \n"
        "L2:   * 【0†Sun - Wikipedia†en.wikipedia.org】 The Sun is the star.\n"
        "L3:   * 【1†NASA: Sun†science.nasa.gov】")
    assert browser.call("open", {"id": 0}) == (
        "[1] Sun (https://en.wikipedia.org/wiki/Sun)\n"
        "**viewing lines [0 - 9] of 9**\n\n"
        "L0: \n"
        "L1: URL: https://en.wikipedia.org/wiki/Sun\n"
        "L2: # Sun\n"
        "L3: \n"
        "L4: The Sun is a 【0†star】 (see 【1†NASA†nasa.gov】).\n"
        "L5: \n"
        "L6: ## Layers\n"
        "L7: \n"
        "L8:   * Core\n"
        "L9:   * Corona")
    assert browser.page().links == {0: "https://en.wikipedia.org/wiki/Star", 1: "https://nasa.gov/sun"}
    assert browser.call("find", {"pattern": "Cor"}) == (  # one match: its four lines include L9 too
        "[2] Find results for text: `cor` in `Sun` (https://en.wikipedia.org/wiki/Sun/find?pattern=cor)\n"
        "**viewing lines [0 - 2] of 2**\n\n"
        "L0: # 【0†match at L8】\n"
        "L1:   * Core\n"
        "L2:   * Corona")
    assert browser.call("open", {"id": 0, "loc": 8}).split("\n")[1] == "**viewing lines [8 - 9] of 9**"


def test_wrapped_lines_and_a_token_bounded_view(tmp_path):
    """Lines are wrapped at 80 characters; a view without num_lines stops after about view_tokens tokens."""
    (tmp_path / "long.txt").write_text("\n".join(f"Entry {n}: " + "word " * 30 for n in range(200)))
    browser = BrowserTool(LocalBackend(tmp_path), view_tokens=300)
    view = browser.call("open", {"id": "long.txt"})
    shown = lines_of(view)
    entry = number(shown, "Entry 0: " + "word " * 14)  # wrapped, the spaces kept
    assert all(len(line) <= 80 for line in shown.values()) and shown[entry + 1].startswith("word")
    last = max(shown)
    assert 10 < last < 60 and f"**viewing lines [0 - {last}] of {entry + 399}**" in view
    assert len(browser.call("open", {"loc": 100, "num_lines": 2}).split("\n")) == 5


def test_bad_calls_answer_with_an_error_text(browser):
    assert browser.call("find", {"pattern": "x"}) == "No pages to access!"
    assert json.loads(browser.call("browser.fly", "{}")) == {"error": "Unknown function: browser.fly"}
    for arguments, message in [("{not json", "Expecting property name"), ("[1, 2]", "expected a JSON object"),
                               ('{"query": "x", "bad": 1}', "unexpected keyword argument 'bad'"),
                               ("{}", "missing a required argument: 'query'")]:
        error = json.loads(browser.call("search", arguments))["error"]
        assert error.startswith("Invalid function arguments for browser.search: ") and message in error
    assert browser.call("search", {"query": "sun", "topn": "five"}) == "`topn` should be an integer, not `'five'`"
    assert browser.call("search", {"query": ["sun"]}) == "`query` should be a string, not `['sun']`"
    browser.call("search", {"query": "sun"})
    assert browser.call("open", {"id": 7}) == "Invalid link id `7`."
    assert browser.call("open", {"id": [0]}) == "`id` should be an integer, not `[0]`"
    assert browser.call("open", {"cursor": 5}) == "Cursor `5` is out of range. Available cursor indices: [0 - 0]."
    assert browser.call("open", {"loc": 50}) == "Invalid location parameter: `50`. Cannot exceed page maximum of 5."
    assert browser.call("find", {"pattern": "sun"}) == "Cannot run `find` on search results page or find results page"
    assert browser.call("find", {"pattern": ""}) == "`pattern` should be a non-empty string, not `''`"
    assert browser.call("open", {"id": "../outside.md"}).startswith("Error fetching URL `../outside.md`: no document")
    assert browser.call("open", {"id": 0}).startswith("[1] ")  # the failed calls took no cursor
    with pytest.raises(BrowserError, match="Invalid link id"):
        browser.open(id=9)


def test_no_results_is_said_plainly(browser):
    assert browser.call("search", {"query": "zebra quantum"}) == (
        "[0] zebra quantum\n**viewing lines [0 - 0] of 0**\n\nL0: No search results for query: `zebra quantum`")
    assert browser.call("search", {"query": "  "}).endswith("L0: No search results for query: `  `")


def test_backend_failures_reach_the_model_as_text():
    class Broken:
        def search(self, query, topn):
            raise ConnectionError("service unavailable")

        def fetch(self, url):
            raise TimeoutError("timed out")

    browser = BrowserTool(Broken())
    assert browser.call("search", {"query": "sun"}) == "Error during search for `sun`: service unavailable"
    assert browser.call("open", {"id": "https://x.org"}) == "Error fetching URL `https://x.org`: timed out"


def test_local_backend_refuses_a_folder_without_documents(tmp_path):
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        LocalBackend(tmp_path / "missing")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(FileNotFoundError, match=r"no \.txt, \.md, .* files under"):
        LocalBackend(tmp_path)


def test_http_backends_need_their_key(monkeypatch):
    monkeypatch.delenv("EXA_API_KEY", raising=False)
    monkeypatch.delenv("YDC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ExaBackend needs an API key: set the EXA_API_KEY environment variable"):
        ExaBackend()
    with pytest.raises(ValueError, match="YouComBackend needs an API key: set the YDC_API_KEY environment variable"):
        YouComBackend()


def test_http_backends_read_their_apis_answers(monkeypatch):
    """The answers as the reference's backends read them, with the network replaced."""
    answers = {
        "https://api.exa.ai/search": {"results": [{"title": "Sun", "url": "https://a.org/sun", "summary": "A star."}]},
        "https://api.exa.ai/contents": {"results": [{"title": "Sun", "text": "<p>Hot.</p>"}]},
        "https://api.ydc-index.io/v1/search": {"results": {
            "web": [{"title": "Sun", "url": "https://a.org/sun", "snippets": ["A star.", "Hot."]}],
            "news": [{"title": "Flare", "url": "https://b.org/flare", "description": "Big one."}]}},
        "https://api.ydc-index.io/v1/contents": [{"title": "Sun", "html": "<p>Hot.</p>"}],
    }
    sent = []

    def request(url, headers, payload=None, query=None):
        sent.append((url, headers, payload, query))
        return answers[url]

    monkeypatch.setattr(browser_backends, "_request", request)
    exa, you = ExaBackend(api_key="exa-key"), YouComBackend(api_key="you-key")
    assert exa.search("sun", 3) == [SearchResult("Sun", "https://a.org/sun", "A star.")]
    assert sent[-1][1:3] == ({"x-api-key": "exa-key"}, {"query": "sun", "numResults": 3, "contents": {"summary": True}})
    assert you.search("sun", 5) == [SearchResult("Sun", "https://a.org/sun", "A star. Hot."),
                                    SearchResult("Flare", "https://b.org/flare", "Big one.")]
    assert sent[-1][3] == {"query": "sun", "count": 5}
    for backend in (exa, you):
        page = backend.fetch("view-source:https://a.org/sun")
        assert isinstance(page, Page) and (page.url, page.title) == ("https://a.org/sun", "Sun")
        assert page.text == "\nURL: https://a.org/sun\nHot."
