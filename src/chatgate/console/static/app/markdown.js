// Model output is untrusted: Markdown is rendered by marked, then sanitized by DOMPurify before
// it touches the DOM; code blocks are highlighted by highlight.js on the sanitized nodes.
import { marked } from "../vendor/marked-18.2.1/marked.esm.js";
import DOMPurify from "../vendor/dompurify-3.5.0/purify.es.mjs";
import hljs from "../vendor/highlight.js-11.12.0/highlight.min.js";

marked.setOptions({ gfm: true, breaks: true });

const PURIFY = {
  // No style attributes (the CSP refuses inline style anyway), no forms or frames.
  FORBID_ATTR: ["style"],
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
  RETURN_DOM_FRAGMENT: true,
};

// Links open elsewhere and cannot reach back into this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

export function renderMarkdown(target, text) {
  const fragment = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const block of fragment.querySelectorAll("pre code")) hljs.highlightElement(block);
  target.replaceChildren(fragment);
}
