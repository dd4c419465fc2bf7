// Runs the chat page's own script in Node against a real server, with just enough of a DOM for it, types
// the messages given, and prints (JSON) what the page did: the URLs it fetched, the models it listed,
// the conversation it keeps, and the bubbles it shows.
// Usage: node chat_page_harness.js PAGE.html BASE_URL API_KEY [MESSAGE ...]
"use strict";
const fs = require("fs");
const vm = require("vm");

const [page, base, key, ...turns] = process.argv.slice(2);
const script = fs.readFileSync(page, "utf8").match(/<script>([\s\S]*?)<\/script>/)[1];

class El {
  constructor(tag) {
    Object.assign(this, {tag, children: [], listeners: {}, textContent: "", className: "", parentElement: null,
                         scrollTop: 0, scrollHeight: 0});
    this.value = "";
  }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  dispatch(type, ev = {}) { for (const fn of this.listeners[type] || []) fn({preventDefault() {}, ...ev}); }
  append(...kids) { for (const k of kids) { k.parentElement = this; this.children.push(k); } }
  replaceChildren(...kids) { this.children = []; this.append(...kids); }
  remove() { if (this.parentElement) this.parentElement.children = this.parentElement.children.filter((c) => c !== this); }
  requestSubmit() { this.dispatch("submit"); }
  get options() { return this.children; }
}
class Select extends El {  // a <select>: its value is the chosen option's, the first by default
  get value() { return this._value || (this.children[0] ? this.children[0].value : ""); }
  set value(v) { this._value = v; }
}
class Option { constructor(text, value) { this.text = text; this.value = value; } }

const elements = {model: new Select("select")};
for (const id of ["temperature", "max_tokens", "key", "clear", "log", "form", "input", "send"]) elements[id] = new El(id);
Object.assign(elements.temperature, {value: "0"});
Object.assign(elements.max_tokens, {value: "12"});
Object.assign(elements.key, {value: key});
const fetched = [];
const store = new Map();
Object.assign(globalThis, {
  document: {getElementById: (id) => elements[id], createElement: (tag) => new El(tag)},
  localStorage: {getItem: (k) => (store.has(k) ? store.get(k) : null), setItem: (k, v) => store.set(k, String(v))},
  Option,
  fetched,
});
const realFetch = fetch;  // the page's URLs are relative: resolved against the server, and recorded
globalThis.fetch = (url, options) => { fetched.push(url); return realFetch(new URL(url, base), options); };

const driver = `
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const log = document.getElementById("log");
  for (let i = 0; i < 600 && !document.getElementById("model").options.length && !log.children.length; i++) await sleep(10);
  for (const text of ${JSON.stringify(turns)}) {
    document.getElementById("input").value = text;
    document.getElementById("form").dispatch("submit");
    while (running) await sleep(10);
  }
  const bubbles = log.children.map((b) => ({kind: b.className, text: b.children[1].textContent}));
  const models = document.getElementById("model").options.map((o) => o.value);
  console.log(JSON.stringify({fetched, models, messages, bubbles}));
})();`;
vm.runInThisContext(script + driver);
