"""A new user logs in through the browser and opens a record page."""
from __future__ import annotations

import pytest

from tests.factories import PASSWORD, ContactFactory, DealFactory, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_login_and_open_contact_page(page, login, screenshot):
    # Given a salesperson with a contact and a deal
    user = UserFactory(username="ana", first_name="Ana")
    contact = ContactFactory(owner=user, first_name="Grace", last_name="Hopper",
                             email="grace@navy.example")
    DealFactory(owner=user, contact=contact, name="Compiler licences")
    other = ContactFactory(first_name="Hidden", last_name="Person")  # someone else's

    # When she logs in and opens Contacts
    login(user, PASSWORD)
    screenshot(page, "home")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Contacts").click()

    # Then she sees her contact but not a colleague's
    assert page.get_by_role("link", name="Grace Hopper").is_visible()
    assert page.get_by_text(other.last_name).count() == 0
    screenshot(page, "contacts-list")

    # And the contact page shows the fields, the deal, and the place for emails
    page.get_by_role("link", name="Grace Hopper").click()
    assert page.get_by_role("heading", name="Grace Hopper").is_visible()
    assert page.get_by_text("grace@navy.example").is_visible()
    assert page.locator("#related-deals").get_by_role("link", name="Compiler licences").is_visible()
    assert page.locator("#related-emails").is_visible()
    screenshot(page, "contact-detail")


def test_wrong_password_shows_error(page):
    UserFactory(username="bob")
    page.goto("/login/")
    page.get_by_label("Username").fill("bob")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").is_visible()
    assert "/login/" in page.url


def test_create_lead_through_form_with_validation(page, login, screenshot):
    user = UserFactory(username="cleo")
    login(user, PASSWORD)
    page.goto("/leads/new/")
    page.get_by_label("Email", exact=True).fill("not-an-email")
    page.get_by_role("button", name="Save").click()
    # Last name is required and the address is invalid: both say so, nothing is saved
    assert page.locator(".has-error").count() >= 2
    screenshot(page, "lead-form-errors")
    page.get_by_label("Last name").fill("Lovelace")
    page.get_by_label("Email", exact=True).fill("ada@engines.example")
    page.get_by_role("button", name="Save").click()
    assert page.get_by_role("heading", name="Lovelace").is_visible()
    assert page.get_by_text("Lead created.").is_visible()
