"""CMS HTML made fit for email (mailer/cms_html.py): the same allow-list as Markdown,
embeds as links, absolute URLs, images bounded, a text part with the paragraphs."""

from __future__ import annotations

import re

import pytest

from mailer.cms_html import MAX_IMAGE_WIDTH, render_cms_html
from mailer.statements import sanitize_html

BASE = "https://campaign.example/statements/2024/answer"


def test_scripts_handlers_forms_and_hiding_styles_never_survive() -> None:
    html, text = render_cms_html(
        """<p onclick="steal()" onmouseover="x()" style="display:block">Visible.</p>
        <script>document.write('<p>injected</p>')</script><style>p{color:red}</style>
        <p hidden>hidden text</p><div style="display: none">gone too</div>
        <span style="visibility:hidden">and this</span>
        <form action="/donate"><input name="amount" value="5"><button>Give</button></form>
        <object data="/flash.swf"></object><a href="javascript:alert(1)">js link</a>
        <a href="data:text/html,x">data link</a><p style="font-size:0">tiny</p>""",
        BASE,
    )
    for banned in ("<script", "onclick", "onmouseover", "<form", "<input", "<button",
                   "style=", "javascript:", "data:text", "<object", "<style"):  # fmt: skip
        assert banned not in html, banned
    for gone in ("hidden text", "gone too", "and this", "injected", "Give", "color:red"):
        assert gone not in html and gone not in text, gone
    assert "Visible." in text and "js link" in text and "tiny" in text
    assert sanitize_html(html) == html  # what the renderer sanitises again stays the same


def test_relative_urls_become_absolute_against_the_entry() -> None:
    html, text = render_cms_html(
        """<p><a href="/issues/housing">root</a> <a href="../older">up</a>
        <a href="#part-2">anchor</a> <a href="//cdn.example/x.pdf">scheme-relative</a>
        <a href="mailto:press@campaign.example">mail us</a></p>""",
        BASE,
    )
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert hrefs == [
        "https://campaign.example/issues/housing",
        "https://campaign.example/statements/older",
        f"{BASE}#part-2",
        "https://cdn.example/x.pdf",
        "mailto:press@campaign.example",
    ]
    assert "root (https://campaign.example/issues/housing)" in text


def test_without_a_base_relative_urls_are_dropped_not_left_broken() -> None:
    html, _ = render_cms_html('<p><a href="/x">x</a><img src="/y.png" alt="y"></p>', None)
    assert 'href="/x"' not in html and 'src="/y.png"' not in html and "alt=" in html


def test_images_keep_alt_text_use_lazy_sources_and_are_bounded() -> None:
    html, text = render_cms_html(
        """<figure><img src="/a.jpg" alt="The rally" width="2400" height="1600" srcset="/a2.jpg 2x"
        onerror="x()"><figcaption>Caption</figcaption></figure>
        <img data-src="lazy.jpg" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" alt="Lazy">
        <img src="/small.png" alt="" width="120px">""",
        BASE,
    )
    assert '<img src="https://campaign.example/a.jpg" alt="The rally" width="600">' in html
    assert 'src="https://campaign.example/statements/2024/lazy.jpg" alt="Lazy"' in html
    assert 'width="120"' in html and "height" not in html and "srcset" not in html
    assert MAX_IMAGE_WIDTH == 600
    assert "[The rally]" in text and "Caption" in text


@pytest.mark.parametrize(
    ("embed", "link", "label"),
    [
        (
            '<iframe src="https://www.youtube.com/embed/dQw4w9WgXcQ?si=abc" allowfullscreen>'
            "</iframe>",
            "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
            "Watch the video on YouTube",
        ),
        (
            '<iframe src="https://www.youtube-nocookie.com/embed/abcDEF12345"></iframe>',
            "https://www.youtube.com/watch?v=abcDEF12345",
            "Watch the video on YouTube",
        ),
        (
            '<iframe src="https://player.vimeo.com/video/76979871?h=1"></iframe>',
            "https://vimeo.com/76979871",
            "Watch the video on Vimeo",
        ),
        (
            '<blockquote class="instagram-media" data-instgrm-permalink="https://www.instagram'
            '.com/p/C1/"><div><a href="https://www.instagram.com/p/C1/">View this post on '
            'Instagram</a></div></blockquote><script async src="//www.instagram.com/embed.js">'
            "</script>",
            "https://www.instagram.com/p/C1/",
            "View the post on Instagram",
        ),
        (
            '<blockquote class="tiktok-embed" cite="https://www.tiktok.com/@c/video/7">'
            '<section><a href="https://www.tiktok.com/@c">@c</a></section></blockquote>'
            '<script src="https://www.tiktok.com/embed.js"></script>',
            "https://www.tiktok.com/@c/video/7",
            "Watch the video on TikTok",
        ),
        (
            '<div class="fb-post" data-href="https://www.facebook.com/campaign/posts/1"></div>',
            "https://www.facebook.com/campaign/posts/1",
            "View the post on Facebook",
        ),
        (
            '<video controls poster="/p.jpg"><source src="/media/speech.mp4" type="video/mp4">'
            "Your browser cannot play this.</video>",
            "https://campaign.example/media/speech.mp4",
            "Watch the video",
        ),
        (
            '<iframe src="https://maps.example.org/embed?pb=1"></iframe>',
            "https://maps.example.org/embed?pb=1",
            "Open the embedded content on maps.example.org",
        ),
    ],
)
def test_embeds_become_a_plain_link_to_the_original(embed: str, link: str, label: str) -> None:
    html, text = render_cms_html(f"<p>Before.</p>{embed}<p>After.</p>", BASE)
    assert f'<a href="{link.replace("&", "&amp;")}" rel="noopener">{label}</a>' in html
    for banned in ("<iframe", "<script", "<video", "<source", "embed.js", "Your browser"):
        assert banned not in html, banned
    assert f"{label} ({link})" in text
    assert text.index("Before.") < text.index(label) < text.index("After.")


def test_a_tweet_keeps_its_words_as_a_quote_and_links_to_the_post() -> None:
    html, text = render_cms_html(
        """<blockquote class="twitter-tweet"><p lang="en" dir="ltr">Housing is a right.
        <a href="https://t.co/1">pic.twitter.com/1</a></p>&mdash; Campaign (@campaign)
        <a href="https://twitter.com/campaign/status/42?ref_src=twsrc%5Etfw">May 1, 2024</a>
        </blockquote><script async src="https://platform.twitter.com/widgets.js"></script>""",
        BASE,
    )
    assert "<blockquote><p>Housing is a right. pic.twitter.com/1</p>" in html
    assert 'href="https://twitter.com/campaign/status/42?ref_src=twsrc%5Etfw"' in html
    assert "View the post on X" in html and "widgets.js" not in html
    assert "> Housing is a right." in text


def test_the_text_part_keeps_the_paragraphs() -> None:
    _, text = render_cms_html(
        "<h2>Our answer</h2><p>One,\n  two.</p><p>Three <em>four</em>.</p>"
        "<ul><li>five</li><li>six</li></ul>",
        BASE,
    )
    assert text == "Our answer\n----------\n\nOne, two.\n\nThree four.\n\n- five\n- six\n"


def test_an_element_left_open_does_not_swallow_the_statement_silently() -> None:
    html, _ = render_cms_html('<p>Start.</p><iframe src="https://youtu.be/x">', BASE)
    assert "Start." in html and "Watch the video on YouTube" in html
