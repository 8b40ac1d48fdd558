//! HTML to plain text, for the LibreOffice help pages.
//!
//! Tags are dropped; the contents of `script`, `style`, `noscript`, `head` (the title
//! duplicates the page's heading) and the page chrome (`header`, `aside`, `footer`: the same
//! English navigation and debug text on every page) are dropped; entities are decoded;
//! block-level elements (`p`, `div`, `li`, `h1`-`h6`, `br`, `tr`, ...) end a paragraph. Within a
//! paragraph runs of whitespace collapse to one space; `pre` keeps its line breaks. The result
//! is one paragraph per line, with no empty lines and no leading or trailing whitespace.

/// Elements whose whole content is dropped.
const SKIP: &[&str] = &[
    "script", "style", "noscript", "head", "header", "aside", "footer", "template",
];

/// Elements that start or end a paragraph.
const BLOCK: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "tr",
    "td",
    "th",
    "table",
    "thead",
    "tbody",
    "tfoot",
    "pre",
    "blockquote",
    "section",
    "article",
    "nav",
    "main",
    "body",
    "html",
    "hr",
    "caption",
    "figure",
    "figcaption",
    "form",
    "fieldset",
    "legend",
    "details",
    "summary",
    "title",
    "address",
];

/// Converts an HTML page to plain text (see the module doc).
pub(crate) fn html_to_text(html: &str) -> String {
    let mut out = Text::default();
    let mut skip: Option<String> = None; // the element whose content is being dropped
    let mut skip_depth = 0usize;
    let mut pre_depth = 0usize;
    let b = html.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'<' {
            // Comments, doctype, CDATA and processing instructions.
            if html[i..].starts_with("<!--") {
                i = html[i + 4..].find("-->").map_or(b.len(), |j| i + 4 + j + 3);
                continue;
            }
            if let Some(tag) = parse_tag(html, i) {
                i = tag.end;
                let name = tag.name.as_str();
                if let Some(s) = &skip {
                    if name == s {
                        if tag.closing {
                            skip_depth -= 1;
                            if skip_depth == 0 {
                                skip = None;
                            }
                        } else if !tag.self_closing {
                            skip_depth += 1;
                        }
                    }
                    continue;
                }
                if !tag.closing && !tag.self_closing && SKIP.contains(&name) {
                    skip = Some(name.to_string());
                    skip_depth = 1;
                    continue;
                }
                if name == "pre" {
                    if tag.closing {
                        pre_depth = pre_depth.saturating_sub(1);
                    } else if !tag.self_closing {
                        pre_depth += 1;
                    }
                }
                if BLOCK.contains(&name) {
                    out.paragraph_break();
                }
                continue;
            }
            // A lone '<' that opens no tag is text.
            if skip.is_none() {
                out.push_char('<', pre_depth > 0);
            }
            i += 1;
            continue;
        }
        // A run of text up to the next '<'.
        let end = html[i..].find('<').map_or(b.len(), |j| i + j);
        if skip.is_none() {
            decode_entities(&html[i..end], |c| out.push_char(c, pre_depth > 0));
        }
        i = end;
    }
    out.finish()
}

struct Tag {
    name: String,
    closing: bool,
    self_closing: bool,
    end: usize,
}

/// Parses a tag starting at `html[start] == '<'`; `None` when this '<' starts no tag.
/// Declarations (`<!DOCTYPE ...>`, `<?...?>`) come back with an empty name.
fn parse_tag(html: &str, start: usize) -> Option<Tag> {
    let b = html.as_bytes();
    let mut i = start + 1;
    let closing = b.get(i) == Some(&b'/');
    if closing {
        i += 1;
    }
    let decl = matches!(b.get(i), Some(b'!') | Some(b'?'));
    if !decl && !b.get(i).is_some_and(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let name_start = i;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b':' || b[i] == b'!' || b[i] == b'?')
    {
        i += 1;
    }
    let name = if decl {
        String::new()
    } else {
        html[name_start..i].to_ascii_lowercase()
    };
    // Skip attributes, honouring quotes (a '>' inside a quoted value does not end the tag).
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if c == b'>' => {
                let self_closing = i > start && b[i - 1] == b'/' || is_void(&name);
                return Some(Tag {
                    name,
                    closing,
                    self_closing,
                    end: i + 1,
                });
            }
            None => {}
        }
        i += 1;
    }
    // Unterminated tag: drop the rest.
    Some(Tag {
        name,
        closing,
        self_closing: true,
        end: b.len(),
    })
}

fn is_void(name: &str) -> bool {
    matches!(
        name,
        "" | "area"
            | "base"
            | "br"
            | "col"
            | "embed"
            | "hr"
            | "img"
            | "input"
            | "link"
            | "meta"
            | "source"
            | "track"
            | "wbr"
    )
}

/// Decodes `&name;`, `&#123;` and `&#x1F;` references; unknown ones are kept as written.
fn decode_entities(s: &str, mut emit: impl FnMut(char)) {
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        rest[..amp].chars().for_each(&mut emit);
        let after = &rest[amp + 1..];
        let semi = after.find(';').filter(|&j| j > 0 && j <= 32);
        let decoded = semi.and_then(|j| {
            let ent = &after[..j];
            let c = if let Some(num) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                u32::from_str_radix(num, 16).ok().and_then(char::from_u32)
            } else if let Some(num) = ent.strip_prefix('#') {
                num.parse::<u32>().ok().and_then(char::from_u32)
            } else {
                named_entity(ent)
            };
            c.map(|c| (c, j))
        });
        match decoded {
            Some((c, j)) => {
                emit(c);
                rest = &after[j + 1..];
            }
            None => {
                emit('&');
                rest = after;
            }
        }
    }
    rest.chars().for_each(emit);
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        "shy" => '\u{ad}',
        "ndash" => '–',
        "mdash" => '—',
        "hellip" => '…',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "middot" => '·',
        "bull" => '•',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "deg" => '°',
        "times" => '×',
        "larr" => '←',
        "rarr" => '→',
        "uarr" => '↑',
        "darr" => '↓',
        _ => return None,
    })
}

/// Accumulates paragraphs, collapsing whitespace.
#[derive(Default)]
struct Text {
    done: Vec<String>,
    cur: String,
    pending_space: bool,
}

impl Text {
    fn push_char(&mut self, c: char, pre: bool) {
        if c == '\u{ad}' {
            return; // soft hyphen: invisible
        }
        if pre && (c == '\n' || c == '\r') {
            self.line_break();
        } else if c.is_whitespace() {
            self.pending_space = true;
        } else {
            if self.pending_space && !self.cur.is_empty() {
                self.cur.push(' ');
            }
            self.pending_space = false;
            self.cur.push(c);
        }
    }

    fn line_break(&mut self) {
        if !self.cur.is_empty() {
            self.done.push(std::mem::take(&mut self.cur));
        }
        self.pending_space = false;
    }

    fn paragraph_break(&mut self) {
        self.line_break();
    }

    fn finish(mut self) -> String {
        self.line_break();
        self.done.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_scripts_and_chrome() {
        let html = r#"<!DOCTYPE html>
<html lang="ko"><head><title>제목</title><style>p { color: red; }</style>
<script type="text/javascript">var x = "<p>not text</p>";</script></head>
<body><header id="TopLeftHeader"><a href="x"><p>LibreOffice 7.4 Help</p></a></header>
<aside class="leftside"><div><div>Index</div></div></aside>
<div id="DisplayArea"><!-- a comment <p>hidden</p> -->
<h1 id="x" title="a > b">표 <span class="emph">삽입</span></h1>
<p>첫   번째
   문단입니다.</p><p>두 번째&nbsp;문단 &amp; &lt;태그&gt; &#54620;&#xAE00; &bogus; AT&T</p>
<ul><li>하나</li><li>둘<br>셋</li></ul><img src="a.png" alt="그림"></div>
<footer><div id="DEBUG"><p>This page is: /text/x.xhp</p></div></footer></body></html>"#;
        let text = html_to_text(html);
        assert_eq!(
            text,
            "표 삽입\n첫 번째 문단입니다.\n두 번째 문단 & <태그> 한글 &bogus; AT&T\n하나\n둘\n셋"
        );
    }

    #[test]
    fn pre_keeps_line_breaks_and_nested_skips_balance() {
        let html = "<div><pre><code>  Dim a\n    a = 1\n</code></pre></div><aside><aside>x</aside>y</aside><p>z</p>";
        assert_eq!(html_to_text(html), "Dim a\na = 1\nz");
    }

    #[test]
    fn inline_tags_do_not_split_words_and_lone_lt_is_text() {
        assert_eq!(html_to_text("<p>a<b>b</b>c 1 < 2</p>"), "abc 1 < 2");
        assert_eq!(html_to_text(""), "");
        assert_eq!(html_to_text("<p>   </p><div>\n</div>"), "");
    }
}
