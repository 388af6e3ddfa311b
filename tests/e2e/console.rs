//! The web console's files: the page at `/` and its script and style sheet, with their types,
//! revalidation headers and a 304 on a matching `If-None-Match`. What the page does is tested in
//! a real browser (`tests/browser/`).

use crate::harness::*;

#[tokio::test]
async fn the_console_and_its_assets_are_served() {
    let server = Server::start().await;
    let page = server.get("/").go().await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    assert!(page.header("content-security-policy").is_some_and(|csp| csp.contains("default-src 'none'")));
    let html = std::str::from_utf8(&page.bytes).unwrap();
    assert!(html.contains("<title>Sanjevani console</title>"), "{html}");
    assert!(html.contains(r#"src="/console/app.js""#) && html.contains(r#"href="/console/app.css""#));
    assert!(!html.contains("http://") && !html.contains("https://"), "nothing is loaded from elsewhere");

    let etag = page.header("etag").expect("an ETag").to_owned();
    let again = server.get("/").header("if-none-match", &etag).go().await;
    assert_eq!((again.status, again.bytes.len()), (304, 0));
    assert_eq!(again.header("etag"), Some(etag.as_str()));

    for (path, content_type, needle) in [
        ("/console/app.js", "text/javascript; charset=utf-8", "/ws/pharmacy/"),
        ("/console/app.css", "text/css; charset=utf-8", ".map"),
    ] {
        let asset = server.get(path).go().await;
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("content-type"), Some(content_type), "{path}");
        assert_eq!(asset.header("cache-control"), Some("no-cache"), "{path}");
        assert_eq!(asset.header("x-content-type-options"), Some("nosniff"), "{path}");
        assert!(asset.header("etag").is_some_and(|e| e != etag), "{path} has its own ETag");
        assert!(std::str::from_utf8(&asset.bytes).unwrap().contains(needle), "{path}");
    }

    assert_eq!(server.get("/console/nope.js").go().await.status, 404);
    let post = server.post("/").go().await;
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));
}
